"""The training loop: seeded, resumable at any step boundary, and interruptible with Ctrl-C or
SIGTERM (see ``arraybn.stages.interrupts``).

Every random choice is a pure function of the seed and the position in training (batch order:
``(seed, epoch)``; augmentation: ``(seed, epoch, step)``), except dropout masks, which come from
the model's generator whose state is saved. A checkpoint therefore holds everything needed to
continue exactly: model state, optimizer state, dropout generator state, epoch, step, the partial
epoch sums and the history.
"""
import signal
import time

import numpy as np

from arraybn.core import NonFiniteStatisticsError
from arraybn.core.deferred import raise_deferred_errors
from arraybn.data import batch_indices, num_batches, step_rng
from arraybn.errors import ConfigError
from arraybn.nn import SGD, Adam, make_schedule
from arraybn.backends.arrays import to_host
from arraybn.stages.common import evaluate
from arraybn.stages.divergence import (TrainingDiverged, check_gradients, check_loss,
                                       non_finite_loss)
from arraybn.stages.interrupts import handling, signal_of
from arraybn.stages.layer_tracking import LayerTracker
from arraybn.stages.parallel import SingleProcess, loss_share

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def make_optimizer(config, model):
    ops = model.backend.conv_ops()             # the backend's update kernels, where it has them
    if config.optimizer == "adam":
        return Adam(model.parameters(), config.lr, weight_decay=config.weight_decay, ops=ops)
    return SGD(model.parameters(), config.lr, momentum=config.momentum,
               weight_decay=config.weight_decay, ops=ops)


class ForcedInterrupt(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: stop at once, without a checkpoint (the state may be
    half-updated)."""


class _DeferredInterrupt:
    """While active (main thread only), Ctrl-C and SIGTERM set a flag that the loop checks
    between steps, so a checkpoint is never taken half-way through an update. A second signal
    stops at once (ForcedInterrupt) and leaves the last checkpoint as it was. A signal ignored
    on entry stays ignored (``interrupts.handling``).
    """

    def __init__(self):
        self.signum = None                  # the signal that asked to stop
        self._handling = handling({signal.SIGINT: self._handle, signal.SIGTERM: self._handle})

    @property
    def requested(self):
        return self.signum is not None

    def _handle(self, signum, frame):
        stop_at_once = self.requested
        self.signum = signum
        if stop_at_once:
            raise ForcedInterrupt

    def __enter__(self):
        self._handling.__enter__()
        return self

    def __exit__(self, *exc):
        self._handling.__exit__(*exc)


class Trainer:
    """Trains ``model`` on ``splits['train']``, validating on ``splits['val']`` after each epoch.

    ``on_step(info)`` is called after every completed step with a dict (epoch, epochs, step,
    steps, loss, acc); it may raise KeyboardInterrupt to stop at that step boundary.
    ``on_epoch(row)`` gets each history row. ``save_checkpoint(trainer)`` is called at the end of
    every epoch and on interruption.
    """

    def __init__(self, model, config, splits, fill, on_step=None, on_epoch=None,
                 save_checkpoint=None):
        self.model, self.config, self.splits, self.fill = model, config, splits, fill
        self.optimizer = make_optimizer(config, model)
        self.steps_per_epoch = num_batches(len(splits["train"]), config.batch_size, drop_last=True)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"--batch-size {config.batch_size} is larger than the "
                             f"{len(splits['train'])} training images; use a smaller batch size")
        self.schedule = make_schedule(config.schedule, config.lr,
                                      config.epochs * self.steps_per_epoch)
        self.on_step, self.on_epoch = on_step, on_epoch
        self.save_checkpoint = save_checkpoint
        self.epoch, self.step = 0, 0            # position of the next step
        self.stopped_by = None                  # the signal that interrupted fit()
        self.parallel = SingleProcess()         # run_train sets a DataParallel under MPI
        self.sums = {"loss": 0.0, "correct": 0, "count": 0, "seconds": 0.0}
        self.history = []
        # --track-layers: measurements every config.track_every steps; None: no work at all
        self.tracker = LayerTracker(model, config.track_every) if config.track_layers else None

    @property
    def global_step(self):
        return self.epoch * self.steps_per_epoch + self.step

    @property
    def finished(self):
        return self.epoch >= self.config.epochs

    # --- checkpoint state ----------------------------------------------------------------------

    def state(self):
        """``(arrays, info)``: arrays for an .npz, info for JSON; ``restore`` takes them back."""
        arrays = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        arrays.update({f"optim/{k}": np.asarray(v) for k, v in self.optimizer.state_dict().items()})
        info = {"epoch": self.epoch, "step": self.step, "steps_per_epoch": self.steps_per_epoch,
                "sums": dict(self.sums), "history": list(self.history),
                "dropout_rng": self.model.rng.bit_generator.state}
        if self.tracker is not None:
            arrays.update(self.tracker.state())
        return arrays, info

    def restore(self, arrays, info):
        if info["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"the checkpoint has {info['steps_per_epoch']} steps per epoch but "
                             f"this data and batch size give {self.steps_per_epoch}")
        self.model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("model/")})
        self.optimizer.load_state_dict({k[6:]: v for k, v in arrays.items()
                                        if k.startswith("optim/")})
        self.model.rng.bit_generator.state = info["dropout_rng"]
        self.epoch, self.step = int(info["epoch"]), int(info["step"])
        self.sums, self.history = dict(info["sums"]), list(info["history"])
        if self.tracker is not None:
            self.tracker.restore(arrays)

    # --- the loop ------------------------------------------------------------------------------

    def fit(self):
        """Train up to ``config.epochs``; KeyboardInterrupt is re-raised after a checkpoint
        (ForcedInterrupt, a second Ctrl-C, without one)."""
        with _DeferredInterrupt() as interrupt, np.errstate(over="ignore", invalid="ignore",
                                                             divide="ignore"):
            try:
                while not self.finished:
                    self._run_epoch(interrupt)
            except KeyboardInterrupt as exc:
                self.stopped_by = interrupt.signum or signal_of(exc)
                if self.save_checkpoint and not isinstance(exc, ForcedInterrupt):
                    self.save_checkpoint(self)
                raise
        return self.history

    def _run_epoch(self, interrupt):
        train, config = self.splits["train"], self.config
        started = time.perf_counter()
        batches = batch_indices(len(train), config.batch_size, seed=config.seed, epoch=self.epoch,
                                drop_last=True, start=self.step)
        try:
            for index in batches:
                loss_sum, correct, stop = self._train_step(train, index, interrupt.requested)
                self.sums["loss"] += loss_sum
                self.sums["correct"] += correct
                self.sums["count"] += len(index)
                self.step += 1
                self._report_step(loss_sum / len(index), correct / len(index))
                # under MPI only the flag agreed in the step's all-reduce: all stop together
                if stop or (self.parallel.size == 1 and interrupt.requested):
                    raise KeyboardInterrupt
        finally:
            self.sums["seconds"] += time.perf_counter() - started
        self._end_epoch()

    def _train_step(self, train, index, interrupt):
        """One step on the global batch ``index`` (this process's rows of it under MPI); returns
        the global ``(loss sum, correct, stop)``, stop: an interrupt on any process."""
        config, model, xp = self.config, self.model, self.model.backend.xp
        rows = self.parallel.rows(index)
        images, labels = train.images[rows], train.labels[rows]
        if config.augments:
            rng = step_rng(config.seed, self.epoch, self.step)
            images = self.parallel.augment(images, rng, config.augment_config(), self.fill,
                                           len(index), model.backend)
        self.optimizer.lr = self.schedule(self.global_step)
        if self.tracker is not None and self.tracker.due(self.global_step):
            self._measure_layers(images, labels, len(index))
        where = f"epoch {self.epoch + 1}, step {self.step + 1}"
        try:
            logits = model.forward(xp.asarray(images), training=True)
            raise_deferred_errors(model.backend)       # a GPU backend's BN checks: one read
        except NonFiniteStatisticsError as exc:
            raise exc.located(where) from None
        try:
            loss_sum, g_logits = loss_share(logits, xp.asarray(labels), len(index),
                                            model.backend.conv_ops())
        except FloatingPointError:
            raise non_finite_loss(model, images, where) from None
        model.backward(g_logits)
        correct = int((to_host(logits.argmax(axis=1)) == labels).sum())
        loss_sum, correct, _, stop = self.parallel.reduce_step(model, loss_sum, correct,
                                                               len(rows), interrupt)
        check_loss(loss_sum / len(index), logits.shape[1], where)
        check_gradients(model, where, self.optimizer.flat_grad())   # step() uses it as is
        self.optimizer.step()
        return loss_sum, correct, stop

    def _measure_layers(self, images, labels, n_global):
        xp = self.model.backend.xp
        self.tracker.measure(self.optimizer, xp.asarray(images), xp.asarray(labels), n_global,
                             self.global_step, self.epoch + 1)

    def _report_step(self, loss, acc):
        if self.on_step:
            self.on_step({"epoch": self.epoch + 1, "epochs": self.config.epochs,
                          "step": self.step, "steps": self.steps_per_epoch,
                          "loss": loss, "acc": acc})

    def _end_epoch(self):
        started = time.perf_counter()
        try:
            val_loss, val_acc, _ = evaluate(self.model, self.splits["val"],
                                            self.config.eval_batch_size)
        except FloatingPointError:
            raise TrainingDiverged(f"training diverged in epoch {self.epoch + 1}: the validation "
                                   f"loss at its end is not finite") from None
        sums = self.sums
        row = {"epoch": self.epoch + 1, "train_loss": sums["loss"] / sums["count"],
               "train_acc": sums["correct"] / sums["count"], "val_loss": val_loss,
               "val_acc": val_acc, "lr": self.optimizer.lr,
               "seconds": sums["seconds"] + time.perf_counter() - started}
        self.history.append(row)
        self.epoch, self.step = self.epoch + 1, 0
        self.sums = {"loss": 0.0, "correct": 0, "count": 0, "seconds": 0.0}
        if self.on_epoch:
            self.on_epoch(row)
        if self.save_checkpoint and not self.finished:
            self.save_checkpoint(self)
