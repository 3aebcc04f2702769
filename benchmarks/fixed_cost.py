"""A training step's fixed cost: the part that does not shrink with the batch, arraybn vs PyTorch.

Times bare LeNet-5 + BN steps (``train_speed.py``'s contenders: random data, SGD with momentum)
at several batch sizes, each contender and batch in fresh processes of their own, rounds
interleaved: the median step of a round (one slow step in a thousand moves a mean by more than
the 30 us this measures), the median round. It fits ``ms/step = fixed + batch * per_image`` by
least squares. ``fixed`` is the cost of a step's calls (Python, dispatch, allocations, the
optimizer's pass over the parameters); ``per_image`` the work each image adds. A batch-2 step
is not the fixed cost: it holds two images' work too. Usage::

    python3 benchmarks/fixed_cost.py --batches 2,4,8,16,32 --threads 1 --steps 1000
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_speed import contenders, limit_threads, warm_step  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="2,4,8,16,32", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backends", default="numba", help="arraybn backends to time")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--contender", help=argparse.SUPPRESS)   # internal: time one
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.batches = sorted({int(b) for b in args.batches.split(",")})
    except ValueError:
        parser.error(f"--batches must be comma-separated integers; got {args.batches!r}")
    if len(args.batches) < 2 or args.batches[0] < 2:
        parser.error("--batches needs two or more sizes, each at least 2 (BN needs 2 images)")
    if min(args.steps, args.rounds, args.threads) < 1:
        parser.error("--steps, --rounds and --threads must be >= 1")
    return args


def step_ms(contender, batch, args):
    """Median milliseconds per step of one contender at one batch size, in a fresh process."""
    command = [sys.executable, __file__, "--contender", contender, "--batch", str(batch),
               "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def time_contender(args):
    """The median of ``args.steps`` steps (ms) of ``args.contender``, in this process."""
    step_args = argparse.Namespace(contender=args.contender, batch=args.batch, warmup=20,
                                   steps=args.steps, threads=args.threads, model="lenet5",
                                   depth=20, width=16)
    step = warm_step(step_args)
    times = []
    for i in range(step_args.warmup, step_args.warmup + args.steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def fit_line(xs, ys):
    """(intercept, slope) of the least-squares line through the points."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
             / sum((x - mx) ** 2 for x in xs))
    return my - slope * mx, slope


def main(argv=None):
    args = parse_args(argv)
    limit_threads(args.threads)
    if args.contender:
        print(time_contender(args))
        return 0
    chosen = contenders(argparse.Namespace(backends=args.backends, no_torch=args.no_torch))
    times = {(name, b): [] for name in chosen for b in args.batches}
    for _ in range(args.rounds):
        for b in args.batches:
            for name, contender in chosen.items():
                times[name, b].append(step_ms(contender, b, args))
    print(f"\nLeNet-5 + BN, {args.threads} thread(s), median step, median of "
          f"{args.rounds} round(s) x {args.steps} steps, ms")
    print(f"{'contender':<16}" + "".join(f"{'batch ' + str(b):>10}" for b in args.batches)
          + f"{'fixed':>9}{'per image':>11}")
    fits = {}
    for name in chosen:
        medians = [statistics.median(times[name, b]) for b in args.batches]
        fits[name] = fit_line(args.batches, medians)
        print(f"{name:<16}" + "".join(f"{m:10.3f}" for m in medians)
              + f"{fits[name][0]:9.3f}{fits[name][1]:11.4f}")
    reference = fits.get("pytorch cpu")
    for name, (fixed, per_image) in fits.items():
        if reference and name != "pytorch cpu":
            print(f"{name} / pytorch: fixed cost {fixed / reference[0]:.2f}x, "
                  f"per image {per_image / reference[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
