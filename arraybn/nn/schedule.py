"""Learning-rate schedules: ``make_schedule(kind, base_lr, total_steps)(step) -> lr``."""
import math

SCHEDULES = ("constant", "cosine", "step")


def make_schedule(kind, base_lr, total_steps, *, min_lr=0.0, milestones=(0.5, 0.75), gamma=0.1):
    """A function ``step -> learning rate`` for steps 0 .. total_steps.

    constant: base_lr throughout.
    cosine:   min_lr + (base_lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2.
    step:     base_lr * gamma ** (number of milestones passed); milestones are fractions of
              total_steps (default: divide by 10 at 50% and again at 75%).
    Steps beyond total_steps keep the final rate.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if not 0 <= min_lr <= base_lr:
        raise ValueError(f"min_lr must be in [0, base_lr], got {min_lr}")
    if any(not 0 < m < 1 for m in milestones) or not 0 < gamma <= 1:
        raise ValueError("milestones must be fractions in (0, 1) and gamma in (0, 1]; got "
                         f"{milestones}, {gamma}")
    total = int(total_steps)
    bounds = sorted(int(round(m * total)) for m in milestones)

    def schedule(step):
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        step = min(step, total)
        if kind == "constant":
            return float(base_lr)
        if kind == "cosine":
            return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / total))
        return float(base_lr) * gamma ** sum(step >= b for b in bounds)

    return schedule
