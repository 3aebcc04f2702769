"""When a training run has diverged, and where it went wrong first.

A step has diverged when
- its loss is not finite; the error names the first layer whose output is not finite (the step
  is recomputed layer by layer to find it), or
- its loss exceeds ``LOSS_FACTOR * log(C)`` for C classes (230 for 10 classes). ``log(C)`` is
  the loss of uniform predictions, where every run starts; a loss 100 times that gives the true
  class an average probability below ``C**-100``, which no run that learns ever sees, while an
  exploding run (Adam with ``--lr 1e6``) passes it within a few steps, long before it overflows.
  It is a constant rather than a training option: a sane run stays orders of magnitude below
  it, so there is nothing to tune;
- a parameter's gradient is not finite; the error names the parameter.
NumPy's overflow/invalid-value warnings are silenced during training: these checks turn their
consequences into ``TrainingDiverged``.
"""
import math

from arraybn.errors import UserError

LOSS_FACTOR = 100


class TrainingDiverged(UserError, FloatingPointError):
    """Training diverged; the message gives the epoch, step, what went wrong first and what to
    change."""


def loss_bound(num_classes):
    """The largest loss a step may have before it counts as diverged."""
    return LOSS_FACTOR * math.log(num_classes)


def check_loss(loss, num_classes, where):
    """Raise TrainingDiverged when the (finite) ``loss`` exceeds ``loss_bound``."""
    if loss > loss_bound(num_classes):
        raise TrainingDiverged(f"training diverged at {where}: the loss is {loss:.4g}, above "
                               f"{loss_bound(num_classes):.0f} ({LOSS_FACTOR} x log {num_classes} "
                               f"for {num_classes} classes, the loss of uniform predictions)")


def check_gradients(model, where, flat_grad=None):
    """Raise TrainingDiverged naming the parameters whose gradient is not finite.

    ``flat_grad``: the same gradients in one array (``Optimizer.flat_grad()``), if there is
    one: a finite one is one test instead of two NumPy calls per parameter (LeNet-5, in the
    ``arraybn train`` epoch: 0.073 -> 0.013 ms a step; the gather is the one ``step()`` made
    anyway); the parameters are looked at one by one only to name the broken ones."""
    xp = model.backend.xp
    if flat_grad is not None and bool(xp.isfinite(flat_grad).all()):
        return
    params = model.parameters()
    finite = [bool(ok) for ok in xp.stack([xp.isfinite(p.grad).all() for p in params]).tolist()]
    broken = [p.name for p, ok in zip(params, finite) if not ok]
    if broken:
        raise TrainingDiverged(f"training diverged at {where}: the gradient of "
                               f"{', '.join(broken)} is not finite")


def non_finite_loss(model, images, where):
    """TrainingDiverged for a step whose loss is not finite, naming the first layer whose
    output is not finite when the step's forward pass is run again layer by layer."""
    xp = model.backend.xp
    x = xp.asarray(images, dtype=model.dtype)
    culprit = "the input images" if not bool(xp.isfinite(x).all()) else None
    for index, layer in enumerate(model.layers):
        if culprit is not None:
            break
        x = layer.forward(x, True)
        if not bool(xp.isfinite(x).all()):
            culprit = f"layer {index + 1} ({getattr(layer, 'name', None) or type(layer).__name__})"
    found = (f"the first output that is not finite is that of {culprit}" if culprit else
             "every layer's output is finite when the step is recomputed")
    return TrainingDiverged(f"training diverged at {where}: the loss is not finite; {found}")
