"""Convolution chunks on several threads: every chunk runs once, results in chunk order, one
slot per thread, failures raised after all chunks ran, OpenBLAS held to one thread, and
convolutions and a VGG-8 step bit-identical on 1, 2 and 3 threads."""
import threading

import numpy as np
import pytest
import threadpoolctl

from arraybn.nn import chunk_threads as ct
from arraybn.nn import conv as plain
from tests.nn.threaded_steps import step_results


def _record(seen):
    def task(chunk, slot):
        seen.append((chunk, slot, threading.get_ident()))
        return chunk * 10
    return task


def test_chunks_run_once_each_in_order_with_one_slot_per_thread(chunk_threads):
    chunk_threads(3)
    seen = []
    assert ct.run_chunks(_record(seen), list(range(40)), True) == [10 * i for i in range(40)]
    assert sorted(chunk for chunk, _, _ in seen) == list(range(40))
    threads_of_slot = {}
    for _, slot, ident in seen:
        threads_of_slot.setdefault(slot, set()).add(ident)
    assert set(threads_of_slot) <= {0, 1, 2}
    assert all(len(idents) == 1 for idents in threads_of_slot.values())
    me = threading.get_ident()
    assert threads_of_slot.get(0, {me}) == {me}              # slot 0 is the calling thread's
    assert all(me not in threads_of_slot[slot] for slot in threads_of_slot if slot)


def test_a_small_layer_stays_on_the_calling_thread(chunk_threads):
    chunk_threads(3)
    seen = []
    ct.run_chunks(_record(seen), list(range(8)), False)
    assert {(slot, ident) for _, slot, ident in seen} == {(0, threading.get_ident())}
    assert ct.parallel_chunks(0) and not ct.parallel_chunks(-1)   # the fixture's threshold is 0


def test_the_threshold_is_a_layers_forward_flops(monkeypatch):
    monkeypatch.setattr(ct, "MIN_PARALLEL_FLOPS", 100e6)
    assert ct.parallel_chunks(100e6) and not ct.parallel_chunks(99e6)


def test_a_failing_chunk_is_raised_after_every_chunk_ran(chunk_threads):
    chunk_threads(2)
    ran = []

    def task(chunk, slot):
        ran.append(chunk)
        if chunk in (7, 3):
            raise ValueError(f"chunk {chunk}")
        return chunk

    with pytest.raises(ValueError, match="chunk 3"):
        ct.run_chunks(task, list(range(12)), True)
    assert sorted(ran) == list(range(12))


def test_set_threads_rejects_fewer_than_one():
    with pytest.raises(ValueError, match="at least 1, got 0"):
        ct.set_threads(0)


def test_openblas_runs_on_one_thread_once_chunks_have_threads():
    ct.threads()
    counts = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
              if lib["user_api"] == "blas"]
    assert counts and set(counts) == {1}


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 1, 0), (3, 2, 1), (1, 2, 0)])
def test_a_convolution_is_bit_identical_on_1_2_and_3_threads(chunk_threads, rng, k, stride, pad,
                                                            monkeypatch):
    monkeypatch.setattr(plain, "CHUNK_BYTES", 1)         # one image a chunk: 13 chunks -> 12
    x = rng.standard_normal((13, 5, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 5, k, k)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    results = []
    for count in (1, 2, 3):
        chunk_threads(count)
        y, cache = plain.conv2d_forward(x, w, b, stride, pad, np, {})
        gy = np.cos(y)
        results.append((y,) + plain.conv2d_backward(gy, cache, np, True, {}))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_array_equal(got, want)


def test_a_vgg8_step_is_bit_identical_on_1_and_2_threads(rng):
    """At batch 8 VGG-8's conv2 (115 MFLOP) passes the real threshold and runs in parallel."""
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    runs = step_results("vgg8", (("numba", 1), ("numba", 2)), x, labels, 3)
    for got, want in zip(*runs):
        np.testing.assert_array_equal(got, want)
