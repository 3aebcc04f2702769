"""Where one training step of a model + BN goes (LeNet-5 by default, ``--model``): a per-layer timer and a cProfile listing.

Times ``--steps`` steps (after ``--warmup``) of forward, loss, backward and the optimizer, each
layer's forward and backward timed on its own; prints the median per step of every part. The
heap is kept as in ``arraybn train`` (``timing.steady_heap``: without it a fresh process pays
660 page faults a LeNet-5 step that the trainer does not). Set the
thread variables before running, e.g.::

    NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
        python3 benchmarks/profile_step.py --steps 200 [--cprofile]
"""
import argparse
import cProfile
import pstats
import statistics
import time

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--bn-position", default="before")
    parser.add_argument("--model", default="lenet5", help="lenet5, vgg8, plain or resnet")
    parser.add_argument("--depth", type=int, default=20, help="plain/resnet depth")
    parser.add_argument("--width", type=int, default=16, help="plain/resnet first-stage width")
    parser.add_argument("--cprofile", action="store_true", help="also print cProfile's top 25")
    return parser.parse_args(argv)


def _label(layer):
    return f"{type(layer).__name__} {layer.name or ''}".strip()


def timed_step(model, opt, images, labels, times):
    """One step with every part timed into ``times`` (label -> list of seconds)."""
    from arraybn.nn import softmax_cross_entropy
    clock = time.perf_counter
    x = images
    for i, layer in enumerate(model.layers):
        t = clock()
        x = layer.forward(x, True)
        times.setdefault(f"{i:2d} fwd {_label(layer)}", []).append(clock() - t)
    t = clock()
    _, g = softmax_cross_entropy(x, labels, model.backend.conv_ops())
    times.setdefault("loss", []).append(clock() - t)
    for i in range(len(model.layers) - 1, model._backward_from - 1, -1):
        layer = model.layers[i]
        t = clock()
        g = layer.backward(g)
        times.setdefault(f"{i:2d} bwd {_label(layer)}", []).append(clock() - t)
    t = clock()
    opt.step()
    times.setdefault("optimizer", []).append(clock() - t)


def main(argv=None):
    args = parse_args(argv)
    from arraybn.nn import SGD, build_model
    from timing import steady_heap
    steady_heap()                     # freed memory kept, as it is in ``arraybn train``
    model = build_model(args.model, backend=args.backend, seed=0, bn_position=args.bn_position,
                        depth=args.depth, width=args.width)
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9, ops=model.backend.conv_ops())
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch)
    times = {}
    for _ in range(args.warmup):
        timed_step(model, opt, images, labels, {})
    totals = []
    for _ in range(args.steps):
        t = time.perf_counter()
        timed_step(model, opt, images, labels, times)
        totals.append(time.perf_counter() - t)
    print(f"{'part':<32} {'median ms':>10}")
    for label, values in times.items():
        print(f"{label:<32} {statistics.median(values) * 1e3:10.3f}")
    print(f"{'step (timed, median)':<32} {statistics.median(totals) * 1e3:10.3f}")
    if args.cprofile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.steps):
            timed_step(model, opt, images, labels, {})
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
