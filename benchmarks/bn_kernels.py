"""BN speed on the CPU through the public API: numpy, numba, PyTorch and the memory-bandwidth ceiling.

    python3 benchmarks/bn_kernels.py [--repeats 10] [--threads 2] [--shapes 128x120,64x64x112x112]
    python3 benchmarks/bn_kernels.py --backend cupy ...     (runs benchmarks/bn_kernels_cuda.py)

Times are medians per call of ``arraybn.batch_norm_forward`` (training mode, running buffers
updated) and of forward + ``arraybn.batch_norm_backward``; PyTorch runs
``torch.nn.functional.batch_norm`` and ``torch.autograd.grad`` on the same data with the same
number of threads. numba and PyTorch are sampled in turns, and their ratio is the median of the
per-turn ratios, so that a slow spell of this shared machine does not favour either. The
ceiling is a large ``numpy.copyto`` measured in the same run (read |x|, write |x|); on shapes
too large for the caches numba's achieved bandwidth is reported as a fraction of it, counting
the traffic a fused kernel cannot avoid: 2|x| for forward (read x, write y) and 5|x| for
forward + backward (then read gy and x, write gx). The public API
allocates y and gx on every call unless given ``out=``, so a second table times numba with
``out=`` buffers reused between calls on those shapes.
"""
import argparse
import ctypes
import importlib.util
import os
import platform
import subprocess
import sys
import textwrap

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import (format_seconds, interleaved_times, markdown_table, median_ratio,  # noqa: E402
                    median_time, parse_shapes)

import arraybn  # noqa: E402

DEFAULT_SHAPES = "128x6x26x26,128x16x11x11,128x120,64x64x112x112"
BANDWIDTH_MIN_BYTES = 64 * 2**20     # larger than any L3 here: the data streams from DRAM
LARGE_ELEMENTS = 2**22               # fewer repeats above this size
PAUSE_SECONDS = 0.05                 # before each interleaved sample: spinning workers go to sleep


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help=f"comma-separated NxCx... shapes (default {DEFAULT_SHAPES})")
    parser.add_argument("--threads", type=int, default=2, help="threads for numba and torch")
    parser.add_argument("--backend", choices=["cpu", "cupy"], default="cpu",
                        help="cpu: numpy/numba/torch here; cupy: the CUDA benchmark")
    args = parser.parse_args(argv)
    args.shapes = parse_shapes(args.shapes, parser)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    return args


def load_torch(threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def arraybn_timers(x, gy, name):
    """(forward, forward + backward) callables through the public API on backend ``name``."""
    c = x.shape[1]
    gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
    running_mean, running_var = np.zeros(c, np.float32), np.ones(c, np.float32)

    def forward():
        return arraybn.batch_norm_forward(x, gamma, beta, training=True, running_mean=running_mean,
                                          running_var=running_var, backend=name)

    def forward_backward():
        arraybn.batch_norm_backward(gy, forward()[1])
    return forward, forward_backward


def torch_timers(torch, x, gy):
    c = x.shape[1]
    tx = torch.from_numpy(x).requires_grad_()
    tgy = torch.from_numpy(gy)
    weight = torch.ones(c, requires_grad=True)
    bias = torch.zeros(c, requires_grad=True)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    F = torch.nn.functional

    def forward():
        with torch.no_grad():
            return F.batch_norm(tx, running_mean, running_var, weight, bias, training=True)

    def forward_backward():
        y = F.batch_norm(tx, running_mean, running_var, weight, bias, training=True)
        torch.autograd.grad(y, (tx, weight, bias), tgy)
    return forward, forward_backward


def measure_shape(shape, repeats, torch):
    """Seconds per call: {'numpy': (fwd, fwd+bwd), 'numba': ..., 'torch': ..., 'copy': t}, and
    'ratios': numba/torch (fwd, fwd+bwd) as medians of ratios from interleaved samples."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    gy = rng.standard_normal(shape, dtype=np.float32)
    reps = repeats if x.size <= LARGE_ELEMENTS else max(3, repeats // 3)
    min_seconds = 0.02 if x.size <= LARGE_ELEMENTS else 0.0
    timed = lambda f, r=reps: median_time(f, r, warmup=2, min_seconds=min_seconds)
    result = {}
    if "numpy" in arraybn.available_backends():   # slow: timed alone, fewer repeats when large
        result["numpy"] = tuple(timed(f, 3 if reps < repeats else reps)
                                for f in arraybn_timers(x, gy, "numpy"))
    contenders = {}
    if "numba" in arraybn.available_backends():
        contenders["numba"] = arraybn_timers(x, gy, "numba")
    if torch is not None:
        contenders["torch"] = torch_timers(torch, x, gy)
    ratios, times = [], {name: [] for name in contenders}
    for k in (0, 1):                                # forward, forward + backward
        medians, rounds = interleaved_times({name: f[k] for name, f in contenders.items()},
                                            reps, warmup=2, min_seconds=min_seconds,
                                            pause=PAUSE_SECONDS)
        for name in contenders:
            times[name].append(medians[name])
        ratios.append(median_ratio(rounds, "numba", "torch"))
    result.update({name: tuple(t) for name, t in times.items()}, ratios=tuple(ratios))
    copy = np.empty_like(x)
    result["copy"] = timed(lambda: np.copyto(copy, x))
    if x.nbytes >= BANDWIDTH_MIN_BYTES and "numba" in result:
        result["kernels"] = tuple(timed(f) for f in kernel_timers(x, gy))
        result["copy_fresh"] = timed(lambda: np.copyto(np.empty_like(x), x))
    return x.nbytes, result


def kernel_timers(x, gy):
    """(forward, forward + backward) through the public API with ``out=`` buffers reused between
    calls: without them y and gx are fresh arrays on every call, and the first touch of fresh
    memory (page faults, zeroing by the OS) costs about as much as a copy on large arrays."""
    y, gx = np.empty_like(x), np.empty_like(x)
    running_mean, running_var = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)

    def forward():
        return arraybn.batch_norm_forward(x, None, None, running_mean=running_mean,
                                          running_var=running_var, backend="numba", out=y)

    def forward_backward():
        _, cache = forward()
        arraybn.batch_norm_backward(gy, cache, out=gx)
    return forward, forward_backward


def table_row(shape, nbytes, r):
    pick = lambda name, k: r[name][k] if name in r else None
    fmt = lambda t: None if t is None else format_seconds(t)
    fractions = [None, None]
    if "numba" in r and nbytes >= BANDWIDTH_MIN_BYTES:
        copy_bandwidth = 2 * nbytes / r["copy"]
        fractions = [f"{traffic * nbytes / pick('numba', k) / copy_bandwidth:.2f}"
                     for k, traffic in ((0, 2), (1, 5))]
    return ["x".join(map(str, shape)), fmt(pick("numpy", 0)), fmt(pick("numba", 0)),
            fmt(pick("torch", 0)), fmt(pick("numpy", 1)), fmt(pick("numba", 1)),
            fmt(pick("torch", 1)), *(None if q is None else f"{q:.2f}" for q in r["ratios"]),
            fmt(r["copy"]),
            f"{2 * nbytes / r['copy'] / 1e9:.1f}", *fractions]


HEADERS = ["shape (float32)", "numpy fwd", "numba fwd", "torch fwd", "numpy f+b", "numba f+b",
           "torch f+b", "numba/torch fwd", "numba/torch f+b", "copy", "copy GB/s",
           "numba fwd / copy BW", "numba f+b / copy BW"]


KERNEL_HEADERS = ["shape (float32)", "numba fwd", "numba f+b", "copy", "copy to fresh array",
                  "fwd / copy BW", "f+b / copy BW"]


def kernel_row(shape, nbytes, r):
    copy_bandwidth = 2 * nbytes / r["copy"]
    fwd, fwd_bwd = r["kernels"]
    return ["x".join(map(str, shape)), format_seconds(fwd), format_seconds(fwd_bwd),
            format_seconds(r["copy"]), format_seconds(r["copy_fresh"]),
            f"{2 * nbytes / fwd / copy_bandwidth:.2f}",
            f"{5 * nbytes / fwd_bwd / copy_bandwidth:.2f}"]


def first_call_overhead():
    """(import numba, first numba forward+backward minus a warm one), seconds, in a fresh process.

    The disk cache is warm (a first process fills it if it was cold). The first call includes
    Numba's own once-per-process start-up, which any cached Numba function pays.
    """
    script = textwrap.dedent("""
        import time, numpy as np, arraybn
        start = time.perf_counter()
        import numba
        import_seconds = time.perf_counter() - start
        x = np.random.default_rng(0).standard_normal((64, 8, 300), dtype=np.float32)
        g, b = np.ones(8, np.float32), np.zeros(8, np.float32)
        times = []
        for _ in range(2):
            t = time.perf_counter()
            y, cache = arraybn.batch_norm_forward(x, g, b, backend="numba")
            arraybn.batch_norm_backward(y, cache)
            times.append(time.perf_counter() - t)
        print(import_seconds, times[0] - times[1])
    """)
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True)
    import_seconds, first_call = (float(v) for v in out.stdout.split()[-2:])
    return import_seconds, first_call


def run_cuda_benchmark(argv):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bn_kernels_cuda.py")
    spec = importlib.util.spec_from_file_location("bn_kernels_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of handing it back to the OS; returns
    whether it could (not glibc: no).

    Otherwise whether a fresh 1 MB output array is carved from pages the process already touched
    depends on the heap's layout at that moment: top-of-heap trimming gives them back, and the
    next allocation page-faults on every 4 KiB (3.6 us each on this VM, 4x the BN call itself on
    128x16x11x11, for whichever library happens to hit it). Both libraries run with it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.backend == "cupy":
        return run_cuda_benchmark(argv)
    heap = "glibc keeps freed memory" if keep_freed_memory() else "default allocator"
    torch = load_torch(args.threads)
    if "numba" in arraybn.available_backends():
        import numba
        numba.set_num_threads(args.threads)
        layer = f"numba {numba.__version__} on {args.threads} threads"
    else:
        layer = "numba unavailable"
    print(f"# arraybn BN kernels, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; {layer}; torch "
          + (f"{torch.__version__} on {torch.get_num_threads()} threads" if torch else "missing")
          + f"; {heap}")
    load_before = os.getloadavg()[0]
    rows, kernel_rows = [], []
    for shape in args.shapes:
        nbytes, result = measure_shape(shape, args.repeats, torch)
        rows.append(table_row(shape, nbytes, result))
        if "kernels" in result:
            kernel_rows.append(kernel_row(shape, nbytes, result))
    if "numba" in arraybn.available_backends():
        import numba
        import_seconds, first_call = first_call_overhead()
        print(f"# numba threading layer: {numba.threading_layer()}; in a fresh process with the "
              f"disk cache warm, `import numba` takes {import_seconds:.2f} s and the first "
              f"forward+backward adds {first_call:.2f} s (Numba start-up + loading the kernels)")
    print(f"# load average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs; timings of threaded code are unreliable once it exceeds "
          "the spare cores")
    print(markdown_table(HEADERS, rows))
    if kernel_rows:
        print("\nnumba through the public API with out= buffers (no page faults), against copies into an "
              "existing and into a freshly allocated array:\n")
        print(markdown_table(KERNEL_HEADERS, kernel_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
