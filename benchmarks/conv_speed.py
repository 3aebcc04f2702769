"""Conv2d forward + backward (ms) for the convolutions of LeNet-5, VGG-8 and ResNet-20, A/B.

Each ``--tree`` is a checkout of arraybn (e.g. a ``git worktree`` of the commit before a change
and the working tree); every round runs each tree in a fresh process of its own (its arraybn
first on ``sys.path``), interleaved (A, B, A, B, ...) so that load from other processes hits
both alike, and the median round is reported. Threads for BLAS and Numba are ``--threads``.
``--torch`` adds PyTorch's ``F.conv2d`` (forward, then backward to the input and the weight) in
the same rounds, and each tree's time as a ratio to it. Usage::

    git worktree add --detach /tmp/before HEAD~1
    python3 benchmarks/conv_speed.py --tree /tmp/before --tree . --rounds 5 --backend numba
    python3 benchmarks/conv_speed.py --torch --rounds 3
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

# (label, batch, in channels, out channels, size, kernel, stride, padding)
LAYERS = (
    ("lenet5 conv1", 128, 1, 6, 28, 3, 1, 0),
    ("lenet5 conv2", 128, 6, 16, 13, 3, 1, 0),
    ("vgg8 conv2", 100, 32, 32, 28, 3, 1, 1),
    ("vgg8 conv4", 100, 64, 64, 14, 3, 1, 1),
    ("vgg8 conv6", 100, 128, 128, 7, 3, 1, 1),
    ("resnet20 16ch 3x3", 100, 16, 16, 28, 3, 1, 1),
    ("resnet20 32ch 3x3", 100, 32, 32, 14, 3, 1, 1),
    ("resnet20 64ch 3x3", 100, 64, 64, 7, 3, 1, 1),
    ("resnet20 1x1 s2", 100, 16, 32, 28, 1, 2, 0),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", help="arraybn checkout (repeat for A/B)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--torch", action="store_true",
                        help="also time PyTorch's convolutions (the test extra installs it)")
    parser.add_argument("--time-here", choices=("arraybn", "torch"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _median_ms(step, repeats):
    step()                                                            # compile, buffers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_layers(args):
    """Median ms of forward + backward per layer of LAYERS, with this process's arraybn."""
    import numpy as np
    import arraybn
    from arraybn.nn import Conv2d
    be = arraybn.get_backend(args.backend)
    rng = np.random.default_rng(0)
    results = []
    for _, n, cin, cout, size, k, stride, pad in LAYERS:
        layer = Conv2d("conv", cin, cout, k, stride=stride, padding=pad, bias=False, rng=rng,
                       backend=be, dtype=np.float32)
        x = rng.standard_normal((n, cin, size, size)).astype(np.float32)
        gy = rng.standard_normal(layer.forward(x, True).shape).astype(np.float32)
        results.append(_median_ms(lambda: (layer.forward(x, True), layer.backward(gy)),
                                  args.repeats))
    return results


def time_torch_layers(args):
    """The same for PyTorch's ``F.conv2d``: forward, then the gradients of x and the weight."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for _, n, cin, cout, size, k, stride, pad in LAYERS:
        x = torch.randn(n, cin, size, size, requires_grad=True)
        weight = torch.randn(cout, cin, k, k, requires_grad=True)
        gy = torch.randn_like(F.conv2d(x, weight, stride=stride, padding=pad))
        results.append(_median_ms(lambda: F.conv2d(x, weight, stride=stride, padding=pad)
                                  .backward(gy), args.repeats))
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.time_here:
        timer = time_torch_layers if args.time_here == "torch" else time_layers
        print(" ".join(f"{ms:.4f}" for ms in timer(args)))
        return 0
    trees = [os.path.abspath(tree) for tree in (args.tree or ["."])]
    contenders = [(tree, "arraybn") for tree in trees] + [(trees[0], "torch")] * args.torch
    env = dict(os.environ, **{var: str(args.threads) for var in (
        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")})
    rounds = {contender: [] for contender in contenders}
    for _ in range(args.rounds):
        for tree, kind in contenders:
            out = subprocess.run(
                [sys.executable, __file__, *argv, "--time-here", kind], check=True, text=True,
                capture_output=True, env=dict(env, PYTHONPATH=tree), cwd=tree).stdout
            rounds[tree, kind].append([float(v) for v in out.split()])
    medians = [[statistics.median(r[i] for r in rs) for i in range(len(LAYERS))]
               for rs in rounds.values()]
    _print_table(args, trees, medians)
    return 0


def _print_table(args, trees, medians):
    """One row per layer: each tree's ms (then PyTorch's), tree 1 / tree 0 for two trees, and
    each tree / PyTorch with ``--torch``."""
    names = [f"tree {i}" for i in range(len(trees))] + ["PyTorch"] * args.torch
    ratios = [("ratio 1/0", 1, 0)] if len(trees) == 2 else []
    ratios += [(f"{i}/torch", i, len(trees)) for i in range(len(trees)) if args.torch]
    print(f"conv forward + backward, ms (median of {args.rounds} rounds), {args.backend}, "
          f"{args.threads} thread(s)")
    for i, tree in enumerate(trees):
        print(f"  tree {i}: {tree}")
    print(f"{'layer':<22}" + "".join(f"{name:>12}" for name in names)
          + "".join(f"{label:>11}" for label, _, _ in ratios))
    for i, (label, *_) in enumerate(LAYERS):
        row = [times[i] for times in medians]
        print(f"{label:<22}" + "".join(f"{ms:12.3f}" for ms in row)
              + "".join(f"{row[a] / row[b]:11.2f}" for _, a, b in ratios))


if __name__ == "__main__":
    sys.exit(main())
