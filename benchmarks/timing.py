"""Small helpers shared by the CPU benchmarks: warm-up, median of repeats, a markdown table, and
the heap setting of processes that run bare training steps (``steady_heap``)."""
import ctypes
import statistics
import time


def median_time(func, repeats=20, warmup=2, min_seconds=0.0):
    """Median wall time in seconds of ``func()`` over ``repeats`` calls, after ``warmup`` calls.

    When ``min_seconds`` > 0, each sample times a loop of as many calls as it takes to last at
    least that long (for calls of a few microseconds) and reports the time per call.
    """
    for _ in range(warmup):
        func()
    inner = _calls_per_sample(func, min_seconds)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            func()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def interleaved_times(funcs, repeats=20, warmup=2, min_seconds=0.0, pause=0.0):
    """Per-call times of the callables in ``funcs`` (a dict), sampled in turns.

    Each round takes one sample of every callable, so a slow spell of a shared machine hits all
    of them alike. ``pause`` seconds of sleep before each sample let the OpenMP workers of the
    previous one stop spinning (libgomp's default spins for milliseconds after a parallel
    region, on cores the next sample needs). Returns ``(medians, rounds)``: the median seconds
    per call of each, and the list of rounds (a dict of seconds per call each), from which
    ``median_ratio`` takes ratios.
    """
    inner = {}
    for name, func in funcs.items():
        for _ in range(warmup):
            func()
        inner[name] = _calls_per_sample(func, min_seconds)
    rounds = []
    for _ in range(repeats):
        sample = {}
        for name, func in funcs.items():
            time.sleep(pause)
            start = time.perf_counter()
            for _ in range(inner[name]):
                func()
            sample[name] = (time.perf_counter() - start) / inner[name]
        rounds.append(sample)
    medians = {name: statistics.median(r[name] for r in rounds) for name in funcs}
    return medians, rounds


def median_ratio(rounds, a, b):
    """Median over the rounds of time(a) / time(b), or None when either was not timed."""
    if not rounds or a not in rounds[0] or b not in rounds[0]:
        return None
    return statistics.median(r[a] / r[b] for r in rounds)


def _calls_per_sample(func, min_seconds):
    calls = 1
    while min_seconds > 0:
        start = time.perf_counter()
        for _ in range(calls):
            func()
        if time.perf_counter() - start >= min_seconds:
            break
        calls *= 2
    return calls


def format_seconds(seconds):
    """'12.3 us', '4.56 ms' or '1.23 s'."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def markdown_table(headers, rows):
    """A GitHub markdown table as one string; cells are str()-ed, None shows as '-'."""
    cells = [[("-" if cell is None else str(cell)) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    out = [line([str(h) for h in headers]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def parse_shapes(text, parser):
    """'128x6x26x26,128x120' -> [(128, 6, 26, 26), (128, 120)]; bad text is a parser error."""
    try:
        shapes = [tuple(int(d) for d in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        parser.error(f"--shapes must look like 128x6x26x26,128x120; got {text!r}")
    if any(len(s) < 2 for s in shapes):
        parser.error("each shape needs at least N and C")
    return shapes


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameters


def steady_heap():
    """Make glibc's malloc keep the memory it frees, as it ends up doing in ``arraybn train``;
    True where it was set (glibc only: elsewhere nothing changes).

    A process that runs bare steps (``profile_step.py``, ``train_speed.py``) starts with
    glibc's mmap threshold at 128 KB, raised only as large blocks are freed, and trims its heap
    top past twice that; so a step's large temporaries came back as fresh zero-filled pages
    every step: LeNet-5 660 minor page faults a step (batch 128), ResNet-20 11,000 (batch 100),
    and a one-thread LeNet-5 step of 5.2-5.3 ms instead of 4.4. ``arraybn train`` has none in
    its epochs (counted: 0 in epochs 2 and 3; presumably the large blocks it frees while loading
    the data raise the threshold; with this setting in the trainer its epoch took 0.808 s against
    0.805, 4 rounds), so only the bare-step benchmarks set it: the largest mmap threshold (32 MB
    on 64 bits) and a 1 GiB trim threshold. Both are needed: setting one turns the dynamic threshold off with the other at its default
    (the trim threshold alone: 1,800 faults a step).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):     # no C library by that name, no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
