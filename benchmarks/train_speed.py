"""Seconds per epoch of BN training: arraybn's CPU backends vs the same net in PyTorch.

Same thread count for everyone (BLAS, Numba and PyTorch threads are all set to ``--threads``),
random 28x28 data, batch 128, SGD with momentum. Each contender runs ``--steps`` steps per round in
a fresh process of its own, with its library's default environment: in one shared process the
OpenMP workers of one library spin while the other computes (each library's defaults are what its
users get). Rounds are interleaved (numpy, numba, torch, numpy, ...) so that load from other
processes hits everyone alike, and the median round is reported, extrapolated to an epoch of
60,000 images. ``--model`` picks LeNet-5 (default) or a deep model (vgg8, plain with
``--depth``/``--width``, resnet with ``--depth``); the PyTorch twins of the deep models are the
test suite's (``tests/nn/torch_nets.py``). Usage::

    python3 benchmarks/train_speed.py --steps 200 --rounds 3 --threads 1
    python3 benchmarks/train_speed.py --model resnet --depth 20 --batch 100 --backends numba
"""
import argparse
import math
import os
import statistics
import sys
import time

EPOCH_IMAGES = 60_000
MODELS = ("lenet5", "vgg8", "plain", "resnet")          # those with a PyTorch twin here
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (JIT, caches)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for BLAS, Numba and PyTorch alike")
    parser.add_argument("--backends", default="numpy,numba",
                        help="comma-separated arraybn backends to time")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--model", choices=MODELS, default="lenet5")
    parser.add_argument("--depth", type=int, default=20, help="plain/resnet depth")
    parser.add_argument("--width", type=int, default=16, help="plain/resnet first-stage width")
    parser.add_argument("--contender", help=argparse.SUPPRESS)   # internal: time one, print s/step
    args = parser.parse_args(argv)
    if min(args.steps, args.rounds, args.batch, args.threads) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds, --batch and --threads must be >= 1, --warmup >= 0")
    return args


def limit_threads(threads):
    """Must run before numpy is imported: BLAS reads these once, at load time."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)


def arraybn_contender(backend, args, images, labels):
    """A ``step(i)`` closure training arraybn's ``args.model`` + BN on ``backend``."""
    from arraybn.nn import SGD, build_model, softmax_cross_entropy
    model = build_model(args.model, backend=backend, seed=0, depth=args.depth, width=args.width)
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9, ops=model.backend.conv_ops())
    xp = model.backend.xp
    images, labels = xp.asarray(images), xp.asarray(labels)

    def step(i):
        lo = (i * args.batch) % (len(images) - args.batch + 1)
        logits = model.forward(images[lo:lo + args.batch], training=True)
        _, g_logits = softmax_cross_entropy(logits, labels[lo:lo + args.batch],
                                            model.backend.conv_ops())
        model.backward(g_logits)
        opt.step()

    return step


def torch_contender(args, images, labels):
    import torch
    from torch import nn
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = torch_lenet5() if args.model == "lenet5" else torch_twin(args)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)

    def step(i):
        lo = (i * args.batch) % (len(images) - args.batch + 1)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(images[lo:lo + args.batch]),
                                           labels[lo:lo + args.batch])
        loss.backward()
        opt.step()

    return step


def torch_twin(args):
    """The deep model's PyTorch twin from the test suite (BN before the ReLU)."""
    sys.path.insert(0, REPO)
    from tests.nn.torch_nets import twin
    return twin(dict(name=args.model, bn="full", bn_position="before", bn_momentum=0.1,
                     num_classes=10, in_shape=[1, 28, 28], depth=args.depth, width=args.width))


def torch_lenet5():
    from torch import nn
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120, bias=False), nn.BatchNorm1d(120), nn.ReLU(),
        nn.Linear(120, 84, bias=False), nn.BatchNorm1d(84), nn.ReLU(), nn.Linear(84, 10))


def time_steps(step, first, count):
    start = time.perf_counter()
    for i in range(first, first + count):
        step(i)
    return (time.perf_counter() - start) / count


def warm_step(args):
    """The ``step(i)`` of ``args.contender`` ('torch' or a backend name) in this process, after
    ``args.warmup`` untimed steps, with the heap kept as in ``arraybn train``
    (``timing.steady_heap``)."""
    import numpy as np
    from timing import steady_heap
    steady_heap()
    rng = np.random.default_rng(0)
    pool = min(EPOCH_IMAGES, (args.warmup + args.steps) * args.batch)
    images = rng.standard_normal((pool, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, pool).astype(np.int64)
    if args.contender == "torch":
        step = torch_contender(args, images, labels)
    else:
        step = arraybn_contender(args.contender, args, images, labels)
    for i in range(args.warmup):
        step(i)
    return step


def time_contender(args):
    """Seconds per step of ``args.contender`` in this process (``warm_step``)."""
    return time_steps(warm_step(args), args.warmup, args.steps)


def contenders(args):
    """{table name: contender id} of what can run here."""
    import importlib.util
    import arraybn
    available = arraybn.available_backends()
    chosen = {}
    for name in args.backends.split(","):
        if name in available:
            chosen[f"arraybn {name}"] = name
        else:
            print(f"skipping backend {name!r}: not available here ({', '.join(available)})")
    if not args.no_torch:
        if importlib.util.find_spec("torch"):
            chosen["pytorch cpu"] = "torch"
        else:
            print("skipping PyTorch: not installed")
    return chosen


def run(args, argv):
    """Median seconds per step of each contender over interleaved rounds of fresh processes."""
    import subprocess
    chosen = contenders(args)
    rounds = {name: [] for name in chosen}
    for _ in range(args.rounds):
        for name, contender in chosen.items():
            out = subprocess.run([sys.executable, __file__, *argv, "--contender", contender],
                                 check=True, capture_output=True, text=True).stdout
            rounds[name].append(float(out.split()[-1]))
    return {name: statistics.median(times) for name, times in rounds.items()}


def model_title(args):
    if args.model in ("plain", "resnet"):
        return f"{args.model} depth {args.depth} width {args.width}"
    return "LeNet-5" if args.model == "lenet5" else args.model


def print_table(per_step, args):
    steps_per_epoch = math.ceil(EPOCH_IMAGES / args.batch)
    reference = per_step.get("pytorch cpu")
    print(f"\n{model_title(args)} + BN, batch {args.batch}, {args.threads} thread(s), median of "
          f"{args.rounds} round(s) x {args.steps} steps, epoch = {steps_per_epoch} steps")
    print(f"{'contender':<16} {'ms/step':>9} {'s/epoch':>9} {'vs pytorch':>11}")
    for name, seconds in per_step.items():
        ratio = f"{seconds / reference:10.2f}x" if reference else "       n/a"
        print(f"{name:<16} {seconds * 1e3:9.2f} {seconds * steps_per_epoch:9.2f} {ratio:>11}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    limit_threads(args.threads)
    if args.contender:
        print(time_contender(args))
        return 0
    print_table(run(args, argv), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
