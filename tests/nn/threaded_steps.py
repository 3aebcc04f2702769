"""One training step of a model on given backends and thread counts (chunk threads and Numba's),
for the tests that check that the thread count changes no bit (and the backend no more than
rounding)."""
import numpy as np

from arraybn.experiments.process_pool import limit_threads
from arraybn.nn import build_model, softmax_cross_entropy
from arraybn.nn import chunk_threads as ct


def step_results(name, settings, x, labels, seed):
    """For each (backend, threads) of ``settings``: [logits, every parameter's gradient] of one
    step of ``build_model(name)``; the thread counts are restored afterwards."""
    before = ct.threads()
    runs = []
    try:
        for backend, count in settings:
            limit_threads(count)
            model = build_model(name, backend=backend, seed=seed)
            logits = model.forward(x, True)
            _, g_logits = softmax_cross_entropy(logits, labels)
            model.backward(g_logits)
            runs.append([logits] + [p.grad for p in model.parameters()])
    finally:
        limit_threads(before)
    return runs


def assert_numba_steps_same_and_close_to_numpy(name, x, labels, seed=3):
    """One step of ``name`` on the numba backend: the same bits on one and two threads, and
    within float32 rounding (carried through the BN layers) of the NumPy path's, since the
    convolutions with few channels sum in ``numba_gemm``'s order, not OpenBLAS's."""
    one, two, numpy_run = step_results(name, (("numba", 1), ("numba", 2), ("numpy", 1)), x,
                                       labels, seed)
    for got, want in zip(two, one):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(one, numpy_run):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
