"""Evaluation on a backend that defers its BN checks (the cupy backend on a GPU) raises the
error a CPU backend raises at the call, naming the layer, once per evaluation.

The deferring backend is a NumPy double: its inference coefficients are not checked at the call
(outputs become NaN) and the unusable running statistics are reported by
``take_deferred_failures``, as the cupy kernels do.
"""

import numpy as np
import pytest

import arraybn
from arraybn import NonFiniteStatisticsError
from arraybn.backends.base import DeferredFailure
from arraybn.data import Split
from arraybn.distributed import run_ranks
from arraybn.nn import build_model
from arraybn.stages.common import evaluate
from arraybn.stages.parallel import evaluate_sharded
from tests.deferring_backend import DeferringNumpyBackend


class _DeferringInference(DeferringNumpyBackend):
    """Inference like the cupy backend's: checked later, counted reads of the flags."""

    def inference_coefficients(self, gamma, beta, running_mean, running_var, eps, check):
        def report(xp, mean, var):
            usable = np.isfinite(mean).all() and (var is None or (np.isfinite(var).all()
                                                                 and (var >= 0).all()))
            if not usable:
                self.failures.append(DeferredFailure(self.label, "running statistics",
                                                     (mean, var)))
        with np.errstate(invalid="ignore"):          # a GPU gives NaN without a warning
            return super().inference_coefficients(gamma, beta, running_mean, running_var, eps,
                                                   report)


def _model_and_split(backend, bad_var):
    model = build_model("mlp", backend=backend, seed=3, in_shape=(1, 4, 4), hidden=(6, 5))
    for name, bn in model.bn_layers():
        if name == "bn2":
            bn.running_var[4] = bad_var
    rng = np.random.default_rng(0)
    split = Split(rng.standard_normal((10, 1, 4, 4)).astype(np.float32),
                  rng.integers(0, 10, 10))
    return model, split


@pytest.mark.parametrize("bad_var, error, message", [
    (np.nan, NonFiniteStatisticsError, r"^bn2: non-finite running statistics in channel\(s\) 4;"),
    (-1.0, ValueError, r"^bn2: running_var has negative values in channels \[4\];")])
def test_evaluate_raises_the_cpu_error_once_per_evaluation(bad_var, error, message):
    with pytest.raises(error, match=message) as on_cpu:
        evaluate(*_model_and_split(arraybn.get_backend("numpy"), bad_var), batch_size=4)
    deferring = _DeferringInference()
    with pytest.raises(error, match=message) as deferred:
        evaluate(*_model_and_split(deferring, bad_var), batch_size=4)
    assert str(deferred.value) == str(on_cpu.value)
    assert deferring.reads == 1                      # one read for 3 batches


def test_a_clean_evaluation_reads_the_flags_once_and_raises_nothing():
    deferring = _DeferringInference()
    loss, accuracy, predictions = evaluate(*_model_and_split(deferring, 1.0), batch_size=4)
    assert np.isfinite(loss) and predictions.shape == (10,)
    assert deferring.reads == 1


def test_sharded_evaluation_raises_the_cpu_error_on_every_rank():
    backends = [_DeferringInference(), _DeferringInference()]

    def rank(comm):
        model, split = _model_and_split(backends[comm.rank], np.nan)
        with pytest.raises(NonFiniteStatisticsError, match=r"^bn2: non-finite running "):
            evaluate_sharded(model, split, 4, comm)
        return backends[comm.rank].reads

    assert run_ranks(2, rank) == [1, 1]
