"""Train -> postproc -> test for one run: the chain behind ``arraybn run`` and every sweep run."""
import os

from arraybn.nn import BN_KINDS
from arraybn.stages.artifacts import read_manifest
from arraybn.stages.config import PostprocConfig, TestConfig
from arraybn.stages.postproc import run_postproc
from arraybn.stages.run_lock import holding_run_lock
from arraybn.stages.testing import run_test
from arraybn.stages.train import fresh_config, has_checkpoint, run_train

STAGES = ("train", "postproc", "test")
STAGE_OUTPUTS = {"train": "manifest.json", "postproc": "manifest.json", "test": "metrics.json"}


def stage_done(run_dir, stage):
    """Whether ``RUN/stage`` holds its finished output."""
    return os.path.isfile(os.path.join(run_dir, stage, STAGE_OUTPUTS[stage]))


@holding_run_lock()
def run_pipeline(run_dir, config=None, postproc=PostprocConfig(), test=TestConfig(), *,
                 force=False, resume=False, keep_done=False, redo=(), echo=print, on_step=None):
    """Train, post-process and test one run; returns ``{stage: manifest or metrics}``, None for
    a stage that was kept as it was.

    config, force, resume, on_step: as for ``run_train``.
    postproc: a PostprocConfig, or None for no postproc stage (a model without BN has none).
    test: a TestConfig (its batch size None: the run's eval_batch_size).
    keep_done=False (``arraybn run``): train as ``run_train`` does, then make postproc and test
        again (results of an earlier model would be stale).
    keep_done=True (sweeps): keep each stage whose output exists unless ``redo`` names it or a
        stage before it ran; an interrupted training resumes from its checkpoint.
    """
    run_dir = os.fspath(run_dir)
    results = {"train": None, "postproc": None, "test": None}
    if _must_run(run_dir, "train", keep_done, redo, False):
        results["train"] = _train(run_dir, config, force or "train" in redo, resume, keep_done,
                                  echo, on_step)
    has_bn = read_manifest(run_dir, "train")["config"]["bn"] in BN_KINDS    # not none/group
    if postproc is not None and has_bn and _must_run(run_dir, "postproc", keep_done, redo,
                                                     results["train"] is not None):
        results["postproc"] = run_postproc(run_dir, postproc, force=True, echo=echo)
    earlier_ran = any(result is not None for result in results.values())
    if _must_run(run_dir, "test", keep_done, redo, earlier_ran):
        results["test"] = run_test(run_dir, test, force=True, echo=echo)
    return results


def _must_run(run_dir, stage, keep_done, redo, earlier_ran):
    return not keep_done or stage in redo or earlier_ran or not stage_done(run_dir, stage)


def _train(run_dir, config, force, resume, keep_done, echo, on_step):
    if keep_done and not force and has_checkpoint(run_dir):
        echo("train: resuming the interrupted run")
        config, resume = {"epochs": fresh_config(config).epochs}, True
    return run_train(run_dir, config, force=force, resume=resume, echo=echo, on_step=on_step)
