"""One training step of a model on given backends and thread counts (chunk threads and Numba's),
for the tests that check that the thread count (or the backend) changes no bit."""
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
