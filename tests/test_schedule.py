"""The learning-rate schedules for every run length: sane at any step count, torch's where torch's is.

A one-cycle run of 4 steps divided 0 by 0, and one of 1 step trained at 1e-8 of the peak (issue 15,
findings 5 and 8); here every step count from 1 to 300 is checked against what a one-cycle schedule
must be, and against torch's OneCycleLR wherever that is defined and sane (5 steps and more).
"""
from __future__ import annotations

import math

import pytest

from numpylenet.schedule import ONE_CYCLE_MIN_STEPS, learning_rate, one_cycle_lr, too_few_steps

PEAK = 3e-3
INITIAL, FINAL = PEAK / 25, PEAK / 25 / 1e4   # the defaults div_factor=25, final_div_factor=1e4


def test_one_cycle_is_sane_for_every_step_count():
    for total in range(1, 301):
        check_one_cycle(total)


def check_one_cycle(total: int) -> None:
    rates = [one_cycle_lr(step, total, PEAK) for step in range(total)]
    assert all(math.isfinite(rate) and FINAL * (1 - 1e-12) <= rate <= PEAK for rate in rates)
    top = rates.index(max(rates))
    assert all(a <= b for a, b in zip(rates[:top], rates[1:top + 1])), "not rising to the peak"
    assert all(a >= b for a, b in zip(rates[top:], rates[top + 1:])), "not falling after the peak"
    assert max(rates) >= 0.9 * PEAK, "the run never comes near its peak learning rate"
    assert rates[0] == pytest.approx(PEAK if total < 5 else INITIAL, rel=1e-12)
    if total > 1:
        assert rates[-1] == pytest.approx(FINAL, rel=1e-9)


def test_one_cycle_matches_torch_from_five_steps_on():
    torch = pytest.importorskip("torch")
    for total in [*range(5, 21), *range(21, 301, 23)]:   # every short run, a sample of the longer
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.Adam([param], lr=1.0)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=PEAK, total_steps=total, pct_start=0.25, anneal_strategy="cos",
            cycle_momentum=False, div_factor=25.0, final_div_factor=1e4)
        for step in range(total):
            assert one_cycle_lr(step, total, PEAK) == pytest.approx(optimizer.param_groups[0]["lr"],
                                                                     rel=1e-12), (total, step)
            optimizer.step()
            scheduler.step()


@pytest.mark.parametrize("step, total", [(-1, 10), (10, 10), (0, 0)])
def test_one_cycle_rejects_steps_outside_the_run(step, total):
    with pytest.raises(ValueError):
        one_cycle_lr(step, total, PEAK)


def test_too_few_steps_for_a_one_cycle_run_is_said():
    assert "1 optimiser step " in too_few_steps("one-cycle", 1)
    assert too_few_steps("one-cycle", ONE_CYCLE_MIN_STEPS - 1) is not None
    assert too_few_steps("one-cycle", ONE_CYCLE_MIN_STEPS) is None
    assert too_few_steps("constant", 1) is None
    assert learning_rate("constant", 0, 1, PEAK) == PEAK


def test_an_unknown_schedule_is_named_in_the_error():
    """It was a bare KeyError: 'cosine'."""
    with pytest.raises(ValueError, match="schedule must be one of constant, one-cycle, got 'cosine'"):
        learning_rate("cosine", 0, 10, PEAK)
