"""The stored stages of the BN pipeline: train, postproc (population statistics) and test.

Each stage reads the previous stage's artifacts from a run directory and writes its own
subdirectory atomically; see ``arraybn.stages.artifacts``.
"""
from arraybn.stages.artifacts import StageError
from arraybn.stages.interrupts import StageInterrupted
from arraybn.stages.config import PostprocConfig, TestConfig, TrainConfig
from arraybn.stages.pipeline import run_pipeline
from arraybn.stages.postproc import run_postproc
from arraybn.stages.testing import run_test
from arraybn.stages.train import TrainingInterrupted, run_train

__all__ = ["StageError", "TrainConfig", "PostprocConfig", "TestConfig", "StageInterrupted",
           "TrainingInterrupted", "run_train", "run_postproc", "run_test", "run_pipeline"]
