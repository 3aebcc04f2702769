"""End to end: seconds of one ``arraybn train`` epoch vs the same job written the usual PyTorch way.

The job: LeNet-5 + BN on Fashion-MNIST, ``--train-subset 20000`` (the default 5% validation
split), batch 128, SGD with momentum, 2 epochs; with ``--model vgg8`` or ``--model resnet``
(ResNet-20) the deep net + BN on ``--train-subset 6000`` at batch 100 (the second seed text's).
The time is the second epoch's (training loop + validation): ``seconds`` in arraybn's
history.csv, and the same span in PyTorch (``nn.Sequential`` LeNet-5 + BN with arraybn's layout,
or the test suite's twin of the deep net, ``torch.optim.SGD``, ``F.cross_entropy``,
validation under ``no_grad`` over the same validation split, in batches of the job's eval
batch size (256), the same batch order, and with ``--augment`` the same random maps, applied
the usual PyTorch way: ``F.affine_grid`` + ``F.grid_sample``). Every run is a fresh process with
BLAS, OpenMP, Numba and PyTorch threads all set to the thread count; runs are interleaved
(arraybn, torch, arraybn, ...) so that load from other processes hits both alike; the median of
``--rounds`` is kept. A "machine limit" line gives what the hardware allows for one step: the
step's GEMM FLOPs over the measured SGEMM rate of the same shapes, and its tensor bytes over the
measured copy bandwidth (LeNet-5 only). Usage::

    python3 benchmarks/train_epoch.py --threads 1,2 --rounds 3 [--augment] [--coretype Haswell]
    python3 benchmarks/train_epoch.py --model resnet --threads 1,2 --rounds 2
"""
import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = dict(epochs=2, train_subset=20000, optimizer="sgd", backend="numba")
BATCH = 128
DEEP_JOB = dict(JOB, train_subset=6000, depth=20)     # --model vgg8 / resnet (ResNet-20)
DEEP_BATCH = 100
MODELS = ("lenet5", "vgg8", "resnet")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--model", choices=MODELS, default="lenet5",
                        help="LeNet-5 (default), VGG-8 or ResNet-20")
    parser.add_argument("--train-subset", type=int, metavar="N",
                        help="training images (default: 20000 for LeNet-5, 6000 for the deep nets)")
    parser.add_argument("--augment", action="store_true", help="random affine augmentation")
    parser.add_argument("--blas-one", action="store_true",
                        help="also time arraybn with one BLAS/OpenMP thread and Numba's count")
    parser.add_argument("--coretype", metavar="NAME",
                        help="also time arraybn with OPENBLAS_CORETYPE=NAME (e.g. Haswell), or "
                             "'auto': with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset, the "
                             "kernel OpenBLAS picks for this CPU")
    parser.add_argument("--contender", choices=("torch", "limit"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.thread_counts = [int(t) for t in args.threads.split(",")]
    args.job, args.batch = (JOB, BATCH) if args.model == "lenet5" else (DEEP_JOB, DEEP_BATCH)
    if args.train_subset is not None:
        args.job = dict(args.job, train_subset=args.train_subset)
    if args.rounds < 1 or min(args.thread_counts) < 1:
        parser.error("--rounds and every --threads value must be >= 1")
    if args.job["train_subset"] < 2 * args.batch:
        parser.error(f"--train-subset must hold at least two batches of {args.batch}")
    return args


def thread_env(threads, blas_threads=None, coretype=None):
    """Every thread variable at ``threads``; BLAS and OpenMP at ``blas_threads`` when given;
    OpenBLAS's kernel forced to ``coretype``, or left to OpenBLAS for 'auto'."""
    env = dict(os.environ, **{var: str(threads) for var in THREAD_VARS})
    if blas_threads is not None:
        env.update({var: str(blas_threads) for var in THREAD_VARS[:3]})
    if coretype == "auto":
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    elif coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    return env


# ----------------------------------------------------------------------------- contenders

def arraybn_epoch(args, threads, blas_threads=None, coretype=None):
    """Second-epoch seconds of ``arraybn train`` (history.csv), in a fresh process."""
    job = args.job
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        cli = os.path.join(os.path.dirname(sys.executable), "arraybn")
        command = [cli, "train", run_dir, "--model", args.model, "--epochs", str(job["epochs"]),
                   "--train-subset", str(job["train_subset"]), "--optimizer", job["optimizer"],
                   "--backend", job["backend"], "--batch-size", str(args.batch), "--force"]
        if args.model == "resnet":
            command += ["--depth", str(job["depth"])]
        subprocess.run(command + (["--augment"] if args.augment else []),
                       env=thread_env(threads, blas_threads, coretype),
                       check=True, capture_output=True, text=True)
        with open(os.path.join(run_dir, "train", "history.csv"), newline="") as file:
            return float(list(csv.DictReader(file))[-1]["seconds"])


def child(args, contender, threads):
    """Run this script as ``contender`` in a fresh process; returns its last printed number."""
    command = [sys.executable, __file__, "--contender", contender, "--threads", str(threads),
               "--model", args.model, "--train-subset", str(args.job["train_subset"])]
    done = subprocess.run(command + (["--augment"] if args.augment else []),
                          env=thread_env(threads), check=True, capture_output=True, text=True)
    return done.stdout.split()[-1] if contender == "torch" else done.stdout


def torch_epochs(args):
    """Train the PyTorch twin for the job's epochs; returns the last epoch's seconds."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from train_speed import torch_lenet5, torch_twin
    from arraybn.data import batch_indices, step_rng
    from arraybn.stages.common import load_data
    from arraybn.stages.config import TrainConfig
    torch.set_num_threads(args.thread_counts[0])
    torch.manual_seed(0)
    config = TrainConfig(**dict(args.job, model=args.model, augment=args.augment,
                                batch_size=args.batch))
    _, splits, norm = load_data(config)
    train, val = splits["train"], splits["val"]
    net = torch_lenet5() if args.model == "lenet5" else torch_twin(
        argparse.Namespace(model=args.model, depth=config.depth, width=config.width))
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum)
    val_images, val_labels = torch.from_numpy(val.images), torch.from_numpy(val.labels)
    for epoch in range(config.epochs):
        started = time.perf_counter()
        net.train()
        for step, index in enumerate(batch_indices(len(train), args.batch, seed=config.seed,
                                                   epoch=epoch, drop_last=True)):
            images = torch.from_numpy(np.ascontiguousarray(train.images[index]))
            if args.augment:
                images = torch_augment(images, step_rng(config.seed, epoch, step), config,
                                       -norm[0] / norm[1])
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(images), torch.from_numpy(train.labels[index]))
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            for lo in range(0, len(val_labels), config.eval_batch_size):
                logits = net(val_images[lo:lo + config.eval_batch_size])
                F.cross_entropy(logits, val_labels[lo:lo + config.eval_batch_size])
        seconds = time.perf_counter() - started
    return seconds


def torch_augment(images, rng, config, fill):
    """arraybn's random affine maps (same draws) applied with ``F.affine_grid`` and bilinear
    ``F.grid_sample``, the background ``fill`` outside the image."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from arraybn.data import random_affine
    n, _, height, width = images.shape
    inverse, offset = random_affine(n, height, width, rng, config.augment_config())
    # arraybn maps (row, col) about the centre; affine_grid maps (x=col, y=row) in [-1, 1]
    theta = np.zeros((n, 2, 3))
    theta[:, :, :2] = inverse[:, ::-1, ::-1]
    theta[:, 0, 2] = offset[:, 1] / ((width - 1) / 2)
    theta[:, 1, 2] = offset[:, 0] / ((height - 1) / 2)
    grid = F.affine_grid(torch.from_numpy(theta).to(images.dtype), list(images.shape),
                         align_corners=True)
    return F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=True) + fill


# ----------------------------------------------------------------------------- machine limit

def lenet5_gemms(batch=BATCH):
    """(name, m, k, n, dgrad) of LeNet-5's GEMMs (m x k times k x n), one per layer.

    A convolution is one im2col GEMM over the batch: weights (Cout, Cin*9) times columns
    (Cin*9, N*OH*OW); a dense layer (N, in) times (in, out). dgrad: whether the backward needs
    the input gradient (not for the first layer).
    """
    return [("conv1", 6, 9, batch * 26 * 26, False),
            ("conv2", 16, 54, batch * 11 * 11, True),
            ("fc1", batch, 400, 120, True),
            ("fc2", batch, 120, 84, True),
            ("fc3", batch, 84, 10, True)]


def step_flops():
    """GEMM FLOPs of one training step: forward, weight gradient and (where needed) input
    gradient, 2*m*k*n each."""
    return sum(2 * m * k * n * (3 if dgrad else 2) for _, m, k, n, dgrad in lenet5_gemms())


def step_bytes():
    """float32 bytes of one step's tensors, each written once and read once: activations
    (conv, BN, ReLU, pool outputs), im2col columns, and the same again for their gradients."""
    b = BATCH
    activations = (b * 6 * 26 * 26 * 3 + b * 6 * 13 * 13 + b * 16 * 11 * 11 * 3 + b * 400
                   + b * 120 * 3 + b * 84 * 3 + b * 10)
    columns = b * 9 * 26 * 26 + b * 54 * 11 * 11
    return 2 * 2 * 4 * (activations + columns)


def measured_sgemm_rate(repeats=30):
    """FLOP/s of numpy float32 matmul over the step's GEMM shapes (best of ``repeats``)."""
    import numpy as np
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal((m, k)).astype(np.float32),
              rng.standard_normal((k, n)).astype(np.float32)) for _, m, k, n, _ in lenet5_gemms()]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for a, b in pairs:
            np.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    flops = sum(2 * m * k * n for _, m, k, n, _ in lenet5_gemms())
    return flops / best


def measured_copy_bandwidth(megabytes=64, repeats=10):
    """Bytes/s moved (read + write) by a large float32 copy (best of ``repeats``)."""
    import numpy as np
    src = np.ones(megabytes * (1 << 20) // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def machine_limit(train_subset=JOB["train_subset"]):
    """One line: the step's FLOPs / SGEMM rate and bytes / copy bandwidth, per step and epoch
    (an epoch of ``train_subset`` images)."""
    steps = train_subset // BATCH
    flops, rate = step_flops(), measured_sgemm_rate()
    nbytes, bandwidth = step_bytes(), measured_copy_bandwidth()
    return (f"{flops / 1e6:.0f} MFLOP/step / {rate / 1e9:.1f} GFLOP/s SGEMM = "
            f"{flops / rate * 1e3:.2f} ms; {nbytes / 1e6:.0f} MB/step / {bandwidth / 1e9:.1f} GB/s "
            f"copy = {nbytes / bandwidth * 1e3:.2f} ms; an epoch of {steps} steps >= "
            f"{steps * max(flops / rate, nbytes / bandwidth):.2f} s (training loop alone)")


# ----------------------------------------------------------------------------- the table

def measure(args):
    """{threads: {'arraybn': [s...], 'pytorch': [s...]}} over interleaved fresh processes."""
    times = {t: {"arraybn": [], "pytorch": [], "blas1": [], "coretype": []}
             for t in args.thread_counts}
    for _ in range(args.rounds):
        for threads in args.thread_counts:
            times[threads]["arraybn"].append(arraybn_epoch(args, threads))
            times[threads]["pytorch"].append(float(child(args, "torch", threads)))
            if args.blas_one:
                times[threads]["blas1"].append(arraybn_epoch(args, threads, 1))
            if args.coretype:
                times[threads]["coretype"].append(
                    arraybn_epoch(args, threads, coretype=args.coretype))
    return times


def print_table(args, times):
    title = {"lenet5": "LeNet-5", "vgg8": "VGG-8", "resnet": "ResNet-20"}[args.model]
    print(f"\n{title} + BN, Fashion-MNIST train subset {args.job['train_subset']}, "
          f"batch {args.batch}, "
          f"SGD{', --augment' if args.augment else ''}: seconds of epoch 2 (loop + validation), "
          f"median of {args.rounds} interleaved fresh processes")
    print(f"{'threads':>7} {'arraybn s':>10} {'pytorch s':>10} {'ratio':>7}   runs "
          "(arraybn | pytorch)")
    for threads, runs in times.items():
        ours, theirs = statistics.median(runs["arraybn"]), statistics.median(runs["pytorch"])
        listed = " | ".join(", ".join(f"{s:.2f}" for s in runs[name])
                            for name in ("arraybn", "pytorch"))
        print(f"{threads:>7} {ours:10.2f} {theirs:10.2f} {ours / theirs:6.2f}x   {listed}")
        if runs["blas1"]:
            blas1 = statistics.median(runs["blas1"])
            print(f"{threads:>7} {blas1:10.2f} {'':>10} {blas1 / theirs:6.2f}x   arraybn with "
                  f"1 BLAS thread: {', '.join(f'{s:.2f}' for s in runs['blas1'])}")
        if runs["coretype"]:
            forced = statistics.median(runs["coretype"])
            print(f"{threads:>7} {forced:10.2f} {'':>10} {forced / theirs:6.2f}x   arraybn with "
                  f"OPENBLAS_CORETYPE={args.coretype}: "
                  f"{', '.join(f'{s:.2f}' for s in runs['coretype'])}")
    for threads in args.thread_counts if args.model == "lenet5" else ():
        print(f"machine limit, {threads} thread(s): "
              + child(args, "limit", threads).strip())


def main(argv=None):
    args = parse_args(argv)
    if args.contender == "torch":
        print(torch_epochs(args))
    elif args.contender == "limit":
        print(machine_limit(args.job["train_subset"]))
    else:
        print_table(args, measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
