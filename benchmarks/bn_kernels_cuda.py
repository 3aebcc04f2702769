"""BN speed on a CUDA GPU: arraybn's CuPy kernels vs cuDNN (through PyTorch) vs copy bandwidth.

    python3 benchmarks/bn_kernels_cuda.py [--repeats 100] [--shapes 128x6x26x26,1024x120]
    python3 benchmarks/bn_kernels.py --backend cupy ...          (the same, from the CPU benchmark)

Needs CuPy (``pip install 'arraybn[gpu]'``) and a CUDA build of PyTorch on a machine with an
NVIDIA GPU. Every time is the median of ``--repeats`` calls, each bracketed by CUDA events on the
stream it runs on, after ``--warmup`` calls; the events also count launch gaps, so a call that is
limited by the CPU (Python, launches, host syncs) is timed as such.

Columns, float32, training mode with running buffers updated:
- ``arraybn``: ``arraybn.batch_norm_forward`` (backend 'cupy'), and forward followed by
  ``arraybn.batch_norm_backward``: the public API, Python overhead and host syncs included.
- ``kernels``: the backend's ``forward_train_finish`` (with the running update) and that +
  ``backward`` alone (what the CUDA kernels cost, without the BN core around them).
- ``cuDNN``: ``torch.nn.functional.batch_norm`` on CUDA with ``torch.backends.cudnn.enabled``,
  and its autograd backward (``torch.autograd.grad`` for x, weight and bias).
- ``vs cuDNN``: arraybn time / cuDNN time (below 1 is faster).
- ``of copy``: achieved bandwidth as a fraction of a device-to-device copy measured in the same
  run (copy bandwidth = 2 * bytes / time), counting the traffic a fused kernel cannot avoid:
  2|x| forward (read x, write y), 5|x| forward + backward (then read gy and x, write gx).
  Without on-chip reuse, forward reads x twice (statistics, then normalize) and backward reads
  gy and x twice, so 2/3 and 5/8 are the ceilings of this count where x does not fit in L2.
The last column is the largest |y - y_torch| (sanity check of the forward output).
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import format_seconds, markdown_table, parse_shapes  # noqa: E402

import arraybn  # noqa: E402

DEFAULT_SHAPES = ("128x6x26x26,128x16x11x11,128x120,1024x6x26x26,1024x16x11x11,1024x120,"
                  "64x64x112x112,256x256x56x56")
COPY_BYTES = 1 << 30
EPS, MOMENTUM = 1e-5, 0.1


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="comma-separated NxCx... float32 shapes (default: the LeNet layers "
                             "at batch 128 and 1024, and two ResNet-sized layers)")
    parser.add_argument("--backend", choices=["cupy"], default="cupy",
                        help="accepted so that benchmarks/bn_kernels.py can forward its options")
    parser.add_argument("--threads", type=int, default=None,
                        help="accepted from benchmarks/bn_kernels.py; CPU threads play no part")
    args = parser.parse_args(argv)
    args.shapes = parse_shapes(args.shapes, parser)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1, --warmup >= 0")
    return args


def load_gpu_stack():
    """(cupy, torch) on a working CUDA device, or SystemExit saying what is missing."""
    try:
        backend = arraybn.get_backend("cupy")
    except arraybn.BackendUnavailableError as exc:
        raise SystemExit(f"this benchmark needs the cupy backend: {exc}") from exc
    try:
        import torch
    except ImportError as exc:
        raise SystemExit("this benchmark needs PyTorch with CUDA for the cuDNN baseline: "
                         "pip install torch") from exc
    if not torch.cuda.is_available():
        raise SystemExit(f"PyTorch {torch.__version__} cannot use CUDA here (a CPU-only build?); "
                         "install a CUDA build of torch for the cuDNN baseline")
    torch.backends.cudnn.enabled = True
    return backend.xp, torch


# ----------------------------------------------------------------------------------------------
# Timing: CUDA events around each call, median over repeats.

def median_event_time(func, start, stop, elapsed_ms, warmup, repeats):
    """Median seconds of ``func()`` between two events recorded on the current stream."""
    for _ in range(warmup):
        func()
    samples = []
    for _ in range(repeats):
        start.record()
        func()
        stop.record()
        stop.synchronize()
        samples.append(elapsed_ms(start, stop) / 1e3)
    return statistics.median(samples)


def cupy_timer(cp, warmup, repeats):
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    return lambda func: median_event_time(func, start, stop, cp.cuda.get_elapsed_time,
                                          warmup, repeats)


def torch_timer(torch, warmup, repeats):
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    return lambda func: median_event_time(func, start, stop, lambda a, b: a.elapsed_time(b),
                                          warmup, repeats)


def copy_bandwidth(cp, timer):
    """Bytes per second of a device-to-device copy (read + write) of a large buffer."""
    src = cp.ones(COPY_BYTES // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    seconds = timer(lambda: dst.data.copy_from_device_async(src.data, src.nbytes))
    return 2 * src.nbytes / seconds


# ----------------------------------------------------------------------------------------------
# One shape

def make_inputs(cp, torch, shape):
    rng = cp.random.default_rng(0)
    c = shape[1]
    x = rng.standard_normal(shape, dtype=cp.float32)
    gy = rng.standard_normal(shape, dtype=cp.float32)
    gamma = rng.uniform(0.5, 2.0, c).astype(cp.float32)
    beta = rng.standard_normal(c, dtype=cp.float32)
    as_torch = lambda a: torch.as_tensor(a, device="cuda").clone()
    return (x, gy, gamma, beta), tuple(as_torch(a) for a in (x, gy, gamma, beta))


def arraybn_calls(cp, x, gy, gamma, beta):
    running = [cp.zeros(x.shape[1], cp.float32), cp.ones(x.shape[1], cp.float32)]

    def forward():
        return arraybn.batch_norm_forward(x, gamma, beta, training=True, running_mean=running[0],
                                          running_var=running[1], momentum=MOMENTUM, eps=EPS,
                                          backend="cupy")

    def forward_backward():
        _, cache = forward()
        return arraybn.batch_norm_backward(gy, cache)
    return forward, forward_backward


def kernel_calls(cp, x, gy, gamma, beta):
    backend = arraybn.get_backend("cupy")
    n, c = x.shape[:2]
    x3, gy3 = x.reshape(n, c, -1), gy.reshape(n, c, -1)
    g64, b64 = gamma.astype(cp.float64), beta.astype(cp.float64)
    running = [cp.zeros(c, cp.float32), cp.ones(c, cp.float32)]

    def forward():       # the training step: statistics, running update, y (no host sync)
        return backend.forward_train_finish(x3, g64, b64, EPS, False, MOMENTUM, *running)

    def forward_backward():
        _, mean, _, inv_std = forward()
        return backend.backward(gy3, x3, mean, g64 * inv_std, inv_std * inv_std)
    return forward, forward_backward


def torch_calls(torch, x, gy, gamma, beta):
    functional = torch.nn.functional
    running = [torch.zeros(x.shape[1], device="cuda"), torch.ones(x.shape[1], device="cuda")]
    xg, wg, bg = (t.detach().clone().requires_grad_(True) for t in (x, gamma, beta))

    def forward():
        return functional.batch_norm(x, running[0], running[1], gamma, beta, training=True,
                                     momentum=MOMENTUM, eps=EPS)

    def forward_backward():
        y = functional.batch_norm(xg, running[0], running[1], wg, bg, training=True,
                                  momentum=MOMENTUM, eps=EPS)
        return torch.autograd.grad(y, (xg, wg, bg), gy)
    return forward, forward_backward


def torch_kernel_names(torch, func):
    """Names of the CUDA kernels one call of ``func`` launches (to see whether cuDNN runs)."""
    profiler = torch.profiler
    with profiler.profile(activities=[profiler.ProfilerActivity.CUDA]) as prof:
        func()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if getattr(e.device_type, "name", "") == "CUDA"}
    return sorted(name.split("(")[0][:60] for name in names)


def measure_shape(cp, torch, shape, timers):
    time_cupy, time_torch = timers
    ours, theirs = make_inputs(cp, torch, shape)
    api_fwd, api_fwdbwd = arraybn_calls(cp, *ours)
    ker_fwd, ker_fwdbwd = kernel_calls(cp, *ours)
    dnn_fwd, dnn_fwdbwd = torch_calls(torch, *theirs)
    y_ours = cp.asnumpy(api_fwd()[0])
    y_torch = dnn_fwd().cpu().numpy()
    result = {
        "api": (time_cupy(api_fwd), time_cupy(api_fwdbwd)),
        "kernels": (time_cupy(ker_fwd), time_cupy(ker_fwdbwd)),
        "cudnn": (time_torch(dnn_fwd), time_torch(dnn_fwdbwd)),
        "max_diff": float(abs(y_ours - y_torch).max()),
        "torch_kernels": torch_kernel_names(torch, dnn_fwdbwd),
        "nbytes": ours[0].nbytes,
    }
    return result


def release_memory(cp, torch):
    """Give the pools' blocks back between shapes so the largest ones fit side by side."""
    cp.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def table_row(shape, result, bandwidth):
    nbytes = result["nbytes"]
    cells = ["x".join(map(str, shape))]
    for k, traffic in ((0, 2), (1, 5)):
        api, kernels, cudnn = result["api"][k], result["kernels"][k], result["cudnn"][k]
        cells += [format_seconds(api), format_seconds(kernels), format_seconds(cudnn),
                  f"{api / cudnn:.2f}", f"{traffic * nbytes / api / bandwidth:.2f}"]
    return cells + [f"{result['max_diff']:.1e}"]


HEADERS = ["shape", "fwd arraybn", "fwd kernels", "fwd cuDNN", "fwd vs cuDNN", "fwd of copy",
           "fwd+bwd arraybn", "fwd+bwd kernels", "fwd+bwd cuDNN", "fwd+bwd vs cuDNN",
           "fwd+bwd of copy", "max |y - y_torch|"]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    cp, torch = load_gpu_stack()
    timers = (cupy_timer(cp, args.warmup, args.repeats), torch_timer(torch, args.warmup,
                                                                     args.repeats))
    bandwidth = copy_bandwidth(cp, timers[0])
    device = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())["name"]
    print(f"# arraybn BN kernels on {device.decode() if isinstance(device, bytes) else device}: "
          f"CuPy {cp.__version__}, torch {torch.__version__}, cuDNN "
          f"{torch.backends.cudnn.version()}; device copy {bandwidth / 1e9:.0f} GB/s; float32, "
          f"median of {args.repeats}")
    rows, kernels = [], []
    for shape in args.shapes:
        result = measure_shape(cp, torch, shape, timers)
        release_memory(cp, torch)
        rows.append(table_row(shape, result, bandwidth))
        kernels.append(f"- {'x'.join(map(str, shape))}: {', '.join(result['torch_kernels'])}")
    print(markdown_table(HEADERS, rows))
    print("\nCUDA kernels of the PyTorch forward + backward:")
    print("\n".join(kernels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
