"""Learning-rate schedules against PyTorch's formulas, and their input checks."""
import math

import pytest

from arraybn.nn import make_schedule


def test_constant_and_cosine():
    constant = make_schedule("constant", 0.1, 10)
    assert [constant(s) for s in (0, 5, 10, 50)] == [0.1] * 4
    cosine = make_schedule("cosine", 0.1, 100, min_lr=0.01)
    assert cosine(0) == pytest.approx(0.1)
    assert cosine(50) == pytest.approx(0.055)
    assert cosine(100) == pytest.approx(0.01) and cosine(400) == pytest.approx(0.01)
    # torch.optim.lr_scheduler.CosineAnnealingLR's closed form with eta_min=0.01, T_max=100
    assert cosine(30) == pytest.approx(0.01 + 0.09 * (1 + math.cos(math.pi * 0.3)) / 2)


def test_step_schedule_divides_at_the_milestones():
    step = make_schedule("step", 1.0, 100)
    assert [step(s) for s in (0, 49, 50, 74, 75, 100)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    custom = make_schedule("step", 1.0, 10, milestones=(0.3,), gamma=0.5)
    assert [custom(s) for s in (2, 3)] == [1.0, 0.5]


@pytest.mark.parametrize("args,kwargs,match", [
    (("linear", 0.1, 10), {}, "unknown schedule"), (("cosine", 0.0, 10), {}, "base_lr"),
    (("cosine", 0.1, 0), {}, "total_steps"), (("cosine", 0.1, 10), {"min_lr": 1.0}, "min_lr"),
    (("step", 0.1, 10), {"milestones": (1.5,)}, "milestones")])
def test_bad_schedules_are_clear_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(*args, **kwargs)


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match="step"):
        make_schedule("constant", 0.1, 10)(-1)
