"""Data-parallel training steps: K processes train the model one process trains.

``DataParallel(comm, model, bn_sync)`` holds what a training step needs under a communicator
(``arraybn.distributed``); ``SingleProcess()`` has the same methods for one process, so the
trainer has one code path.

- Sharding: rank r takes a contiguous slice of every global batch, cut as ``numpy.array_split``
  cuts it (sizes differ by at most one; a rank may get none). Augmentation transforms and dropout
  masks are drawn for the whole global batch on every rank and sliced, so they equal one
  process's and every rank's generators stay in step.
- Loss: each rank's loss gradient is its share of the mean over the GLOBAL batch
  (``sum over its rows / n_global``), so the sum over ranks of every parameter gradient is the
  one-process gradient. BN layers under ``bn_sync='all'`` see the world communicator and
  back-propagate through the global batch statistics.
- One all-reduce per step, of one float64 vector: every parameter gradient, then (with
  ``bn_sync`` local or G) every running buffer times the rank's sample count, then the loss sum,
  the correct count, the sample count and the interrupt flag. Reductions add in rank order, so
  every rank gets bit-identical values and takes the identical optimizer step.
- Running buffers: with 'all' every rank computes the same ones. With 'local' or G (statistics
  of a rank's slice or its group's batch), after every step every rank's running buffers become
  the average of all ranks' buffers weighted by each rank's sample count in that step (a rank
  with an empty slice counts zero), so they are identical on every rank.
"""
import numpy as np

from arraybn.backends.arrays import to_host
from arraybn.data import apply_transforms, draw_transforms
from arraybn.distributed import check_group_size
from arraybn.core.moments import group_moments
from arraybn.errors import ConfigError
from arraybn.stages.common import deferred_bn_errors
from arraybn.nn import softmax_cross_entropy
from arraybn.nn.layers import Dropout
from arraybn.stages.artifacts import StageError

STEP_TOTALS = 4            # loss sum, correct, count, interrupt flag


def shard_bounds(n, size, rank):
    """``(start, stop)`` of rank ``rank``'s rows of ``n``, as ``numpy.array_split`` cuts them."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def bn_group(comm, bn_sync):
    """The communicator BN layers use for ``bn_sync``: comm ('all'), None ('local'), or this
    rank's group of G consecutive ranks."""
    if bn_sync == "all":
        return comm
    if bn_sync == "local":
        return None
    try:
        group_size = check_group_size(int(bn_sync), comm.size)
    except ValueError as exc:
        raise ConfigError(f"--bn-sync {bn_sync}: {exc}") from None
    return None if group_size == 1 else comm.split(group_size)


def loss_share(logits, labels, n_global, ops=None):
    """``(loss sum over these rows, d loss / d logits)`` for the mean loss over ``n_global``
    rows of which these are a part (none at all is allowed); ``ops``: the backend's
    ``conv_ops()`` (its loss kernel, where it has one)."""
    n_local = logits.shape[0]
    if n_local == 0:
        return 0.0, logits * 0
    loss, g_logits = softmax_cross_entropy(logits, labels, ops)
    if n_local != n_global:
        g_logits *= logits.dtype.type(n_local / n_global)
    return loss * n_local, g_logits


class SingleProcess:
    """One process: the whole batch is this process's; nothing to reduce."""
    size, rank, bn_sync = 1, 0, "all"

    def rows(self, index):
        return index

    def augment(self, images, rng, config, fill, n_global, backend=None):
        """``images`` transformed by ``n_global`` transforms drawn from ``rng``, on ``backend``'s
        augmentation kernel where it has one (``arraybn.data.apply_transforms``)."""
        transforms = draw_transforms(n_global, images.shape[2], images.shape[3], rng, config)
        return apply_transforms(images, transforms[self._augmented_rows(len(images))], fill,
                                backend)

    def _augmented_rows(self, n_local):
        return slice(0, n_local)

    def reduce_step(self, model, loss_sum, correct, count, interrupt):
        return loss_sum, correct, count, interrupt


class DataParallel(SingleProcess):
    """Rank ``comm.rank`` of ``comm.size`` in data-parallel training of ``model``."""

    def __init__(self, comm, model, bn_sync):
        self.comm, self.model, self.bn_sync = comm, model, bn_sync
        self.size, self.rank = comm.size, comm.rank
        group = bn_group(comm, bn_sync)
        ghost = [name for name, bn in model.bn_layers() if bn.kind == "ghost"]
        if ghost and group is not None:
            raise ConfigError(f"--bn ghost keeps each process's own ghost batches and cannot "
                              f"synchronise statistics across processes (--bn-sync {bn_sync}); "
                              f"use --bn-sync local")
        for _, bn in model.bn_layers():
            bn.set_communicator(group)
        self.average_buffers = group is not comm and any(
            bn.track_running_stats for _, bn in model.bn_layers())
        self._dropouts = [layer for layer in model.layers if isinstance(layer, Dropout)]
        self._n_global = 0

    def rows(self, index):
        """This rank's slice of the global batch ``index``; remembers its place in it."""
        start, stop = shard_bounds(len(index), self.size, self.rank)
        self._n_global, self._start = len(index), start
        for layer in self._dropouts:
            layer.shard = (start, len(index))
        return index[start:stop]

    def _augmented_rows(self, n_local):
        """This rank's rows of the global batch's transforms (all drawn, as one process does)."""
        return slice(self._start, self._start + n_local)

    def reduce_step(self, model, loss_sum, correct, count, interrupt):
        """Sum every rank's gradients (set back into ``.grad``), average the running buffers
        (local/G) and sum the step's totals; returns the global ``(loss_sum, correct, count,
        interrupt)``, identical on every rank."""
        params = model.parameters()
        buffers = self._buffers() if self.average_buffers else []
        parts = [_host64(p.grad).ravel() for p in params]
        parts += [_host64(b).ravel() * count for b in buffers]
        parts.append(np.array([loss_sum, correct, count, float(interrupt)]))
        total = self.comm.allreduce_sum(np.concatenate(parts))
        xp, offset = model.backend.xp, 0
        for p in params:
            p.grad = _like(total[offset:offset + p.data.size], p.data, xp)
            offset += p.data.size
        for b in buffers:
            b[...] = _like(total[offset:offset + b.size] / total[-2], b, xp)
            offset += b.size
        loss_sum, correct, count, flag = total[-STEP_TOTALS:]
        return float(loss_sum), int(correct), int(count), bool(flag)

    def _buffers(self):
        return [buffer for _, bn in self.model.bn_layers() if bn.track_running_stats
                for buffer in (bn.running_mean, bn.running_var)]


def _host64(a):
    return to_host(a, np.float64)


def _like(values, like, xp):
    """``values`` (host float64) in the shape and dtype of ``like``, on ``xp``."""
    return xp.asarray(values.reshape(like.shape).astype(like.dtype))


def parallel_record(comm, bn_sync):
    """The manifest's record of how many processes trained and how BN was synchronised."""
    if comm is None:
        return {"world_size": 1, "bn_sync": bn_sync, "mpi_library": None}
    library = getattr(comm, "library_version", None)
    return {"world_size": comm.size, "bn_sync": bn_sync,
            "mpi_library": library() if library else type(comm).__name__}


def check_resume_world(info, comm, run_dir):
    """A StageError unless this job has as many processes as the checkpoint's run had."""
    stored, size = int(info.get("world_size", 1)), 1 if comm is None else comm.size
    if stored != size:
        launch = f"mpiexec -n {stored} " if stored > 1 else ""
        raise StageError(f"the checkpoint in {run_dir} was trained by {stored} process(es) and "
                         f"this job has {size}; resume with the same number: `{launch}arraybn "
                         f"train {run_dir} --resume` (or start over with --force)")


def synchronise_bn(model, comm):
    """Every BN layer computes batch statistics over the ranks of ``comm`` (inference with
    batch statistics, postproc); a ghost-batch model cannot."""
    for _, bn in model.bn_layers():
        if bn.kind == "ghost":
            raise StageError("a model trained with --bn ghost has per-process batch statistics; "
                             "run this stage as one process (without mpiexec)")
        bn.set_communicator(comm)


def shard_of_batch(start, stop, comm):
    """This rank's contiguous rows ``slice`` of the batch ``start:stop``."""
    lo, hi = shard_bounds(stop - start, comm.size, comm.rank)
    return slice(start + lo, start + hi)


def evaluate_sharded(model, split, batch_size, comm):
    """``stages.common.evaluate`` over the ranks of ``comm``: rank r takes its slice of every
    batch; ``(mean loss, accuracy, predictions)`` of the whole split, the same on every rank
    (one all-reduce at the end)."""
    xp, n = model.backend.xp, len(split)
    loss_sum, predicted = 0.0, np.zeros(n)
    with deferred_bn_errors(model.backend):      # a GPU backend's BN checks: read once
        for start in range(0, n, batch_size):
            rows = shard_of_batch(start, min(start + batch_size, n), comm)
            logits = model.forward(xp.asarray(split.images[rows]), training=False)
            if rows.stop > rows.start:
                loss, _ = softmax_cross_entropy(logits, xp.asarray(split.labels[rows]),
                                                model.backend.conv_ops())
                loss_sum += loss * (rows.stop - rows.start)
                predicted[rows] = to_host(logits).argmax(axis=1)
    total = comm.allreduce_sum(np.concatenate(([loss_sum], predicted)))
    if n == 0:
        return None, None, np.zeros(0, np.int64)
    predictions = total[1:].astype(np.int64)
    return total[0] / n, float((predictions == split.labels).mean()), predictions


def merge_exact_statistics(observers, comm):
    """Each layer's exact estimator merged over the ranks with Chan's formula (rank order):
    ``{name: (mean, unbiased var)}``, the same on every rank."""
    merged = {}
    for name, observer in observers.items():
        count, mean, m2 = observer.moments()
        total, mean, m2 = group_moments(comm, count, mean, m2)
        if total < 2:
            raise StageError(f"{name}: fewer than two values per channel were seen; use more "
                             "postproc --batches")
        merged[name] = mean, m2 / (total - 1)
    return merged
