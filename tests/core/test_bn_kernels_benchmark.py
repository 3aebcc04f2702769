"""The CPU BN benchmark runs end to end on tiny shapes (no timing is asserted), and its
interleaved sampling helpers and the bare-step heap setting do what they say."""
import ctypes
import subprocess
import sys

import pytest

from tests.benchmark_scripts import BENCHMARKS, load_benchmark


def _load(name):
    return load_benchmark(name)


def test_interleaved_times_samples_every_callable_in_turns():
    timing = _load("timing")
    calls = []
    medians, rounds = timing.interleaved_times({"a": lambda: calls.append("a"),
                                                "b": lambda: calls.append("b")},
                                               repeats=3, warmup=1)
    assert calls[:2] == ["a", "b"] and calls[2:] == ["a", "b"] * 3
    assert len(rounds) == 3 and set(medians) == {"a", "b"}
    assert all(t > 0 for r in rounds for t in r.values())


def test_median_ratio_is_the_median_of_per_round_ratios():
    timing = _load("timing")
    rounds = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 1.0}, {"a": 2.0, "b": 2.0}]
    assert timing.median_ratio(rounds, "a", "b") == 1.0      # ratios 0.5, 3, 1
    assert timing.median_ratio(rounds, "a", "torch") is None
    assert timing.median_ratio([], "a", "b") is None


def test_benchmark_prints_a_row_per_shape(capsys):
    bench = _load("bn_kernels")
    assert bench.main(["--repeats", "1", "--shapes", "8x3x4x4,6x5", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 8x3x4x4")
            or line.startswith("| 6x5 ")]
    assert len(rows) == 2
    assert all(len(row.split("|")) == len(bench.HEADERS) + 2 for row in rows)
    assert "glibc keeps freed memory" in out or "default allocator" in out   # said in the header


def test_benchmark_rejects_a_bad_shape():
    bench = _load("bn_kernels")
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "8xfoo"])


CHURN = """
import resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from timing import steady_heap

def faults_in(rounds):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        blocks = [np.ones(1 << 17) for _ in range(3)]    # three 1 MiB blocks, freed together
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_in(3)
default = faults_in(20)
kept = steady_heap()
faults_in(3)                                             # the heap grows once
print(kept, default, faults_in(20))
"""


def test_steady_heap_keeps_freed_blocks_that_glibc_hands_back_by_default():
    done = subprocess.run([sys.executable, "-c", CHURN, str(BENCHMARKS)], capture_output=True,
                          text=True, timeout=120, check=True)
    kept, default, after = done.stdout.split()
    if kept != "True":
        pytest.skip("not glibc: its malloc settings do not exist here")
    # by default the 1 MiB blocks go on the heap once the first is freed (the mmap threshold
    # rises to 1 MiB), and 3 MiB free at its top pass the 2 MiB trim threshold: every round
    # gives back most of it (here 480 of the 768 pages) and faults it in again
    assert int(default) >= 20 * 256
    assert int(after) == 0


def test_steady_heap_sets_nothing_without_mallopt(monkeypatch):
    timing = _load("timing")

    class NoMallopt:
        def __init__(self, _name):
            pass
    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    assert timing.steady_heap() is False
