"""Cold start: seconds from process start to the first finished training step, with an empty
Numba cache, and which kernels compiled on the way (each kernel's own compile seconds).

Each run is a fresh process with ``NUMBA_CACHE_DIR`` set to a new empty directory, so every
kernel compiles as on a fresh clone; a second run in the same directory shows the warm start, and
``--after-warmup`` first runs ``arraybn warmup`` (what ``make setup`` does on a fresh clone) into the
empty cache, then times the first step::

    python3 benchmarks/cold_start.py --runs 3 [--kernels] [--warm] [--after-warmup]

The child trains ``arraybn train`` (LeNet-5 + BN, numba, Fashion-MNIST) through ``run_train``
and stops at the first step, so data loading and model building count, as they do for a user.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
from numba.core import event
records = []
class _Recorder(event.Listener):
    def __init__(self):
        self.starts = {}
    def on_start(self, ev):
        self.starts[id(ev.data["dispatcher"]), str(ev.data["args"])] = time.perf_counter()
    def on_end(self, ev):
        d = ev.data["dispatcher"]
        start = self.starts.pop((id(d), str(ev.data["args"])), None)
        if start is not None:
            records.append((d.py_func.__module__.rsplit(".", 1)[-1] + "." + d.py_func.__name__,
                            time.perf_counter() - start))
event.register("numba:compile", _Recorder())
from arraybn.stages.train import run_train
def on_step(info):
    cpu = os.times()
    print(json.dumps({"first_step_s": time.perf_counter() - t0,
                      "cpu_s": cpu.user + cpu.system, "compiles": records}), flush=True)
    os._exit(0)                 # stop at the first step: no checkpoint, no files written
config = dict(epochs=1, train_subset=2000, backend="numba", optimizer="sgd")
run_train(sys.argv[1], config, force=True, echo=lambda *_: None, on_step=on_step)
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kernels", action="store_true",
                        help="list every compiled kernel with its compile seconds (first run)")
    parser.add_argument("--warm", action="store_true",
                        help="also time a second run on the filled cache")
    parser.add_argument("--after-warmup", action="store_true",
                        help="also time a first run after `arraybn warmup` filled an empty cache")
    return parser.parse_args(argv)


def warm_up(cache_dir):
    """``arraybn warmup`` into ``cache_dir``, as ``make setup`` does after installing."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    done = subprocess.run([sys.executable, "-c", "from arraybn_cli.main import cli; cli()",
                           "warmup"], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"arraybn warmup failed:\n{done.stderr[-3000:]}")


def one_run(cache_dir):
    """Run the child once with ``cache_dir`` as Numba's cache; returns its JSON record."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    with tempfile.TemporaryDirectory() as run_dir:
        done = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(run_dir, "r")],
                              env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"cold-start child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_table(records):
    """Lines 'seconds  kernel' per kernel (nested compiles count in their callers too)."""
    totals = {}
    for name, seconds in records:
        totals[name] = totals.get(name, 0.0) + seconds
    return [f"  {seconds:6.2f} s  {name}" for name, seconds in
            sorted(totals.items(), key=lambda item: -item[1])]


def main(argv=None):
    args = parse_args(argv)
    cold, warm, after_warmup = [], [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as cache_dir:
            record = one_run(cache_dir)
            cold.append(record["first_step_s"])
            if args.kernels and run == 0:
                print(f"kernels compiled in the first cold run ({len(record['compiles'])} "
                      "compiles; nested kernels count in their callers too):")
                print("\n".join(compile_table(record["compiles"])))
            if args.warm:
                warm.append(one_run(cache_dir)["first_step_s"])
        if args.after_warmup:
            with tempfile.TemporaryDirectory() as cache_dir:
                warm_up(cache_dir)
                record = one_run(cache_dir)
                after_warmup.append(record["first_step_s"])
                if record["compiles"]:
                    print(f"after warmup, {len(record['compiles'])} kernels still compiled:")
                    print("\n".join(compile_table(record["compiles"])))
    print(f"cold start to the first step: median {statistics.median(cold):.1f} s "
          f"(runs: {', '.join(f'{s:.1f}' for s in cold)})")
    if warm:
        print(f"warm start (cache filled):    median {statistics.median(warm):.1f} s "
              f"(runs: {', '.join(f'{s:.1f}' for s in warm)})")
    if after_warmup:
        print(f"after `arraybn warmup`:       median {statistics.median(after_warmup):.1f} s "
              f"(runs: {', '.join(f'{s:.1f}' for s in after_warmup)})")


if __name__ == "__main__":
    main()
