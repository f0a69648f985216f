"""Learning-rate schedules: the learning rate as a pure function of the step number.

A schedule here is a function ``(step, total_steps) -> lr`` with no state, so a resumed run and
``reference.train`` (which sets torch's learning rate from the same function before each step) use
exactly the same rate at every step.
"""
from __future__ import annotations

import math

__all__ = ["SCHEDULES", "constant_lr", "one_cycle_lr", "learning_rate", "too_few_steps"]

# Below this many optimiser steps a one-cycle run is mostly warm-up and cool-down: a quarter of the
# steps climb to the peak, and the rest fall to 4e-6 of it (max_lr / 25 / 1e4).
ONE_CYCLE_MIN_STEPS = 100


def constant_lr(step: int, total_steps: int, max_lr: float) -> float:
    """The same learning rate ``max_lr`` at every step."""
    return max_lr


def one_cycle_lr(step: int, total_steps: int, max_lr: float, *, warmup_fraction: float = 0.25,
                 div_factor: float = 25.0, final_div_factor: float = 1e4) -> float:
    """Leslie Smith's one-cycle schedule, as ``torch.optim.lr_scheduler.OneCycleLR`` (cosine, two phases).

    The rate rises from ``initial = max_lr / div_factor`` to ``max_lr`` over the first
    ``warmup_fraction`` of training, then falls to ``initial / final_div_factor``, each half of a
    cosine::

        cos_anneal(start, end, f) = end + (start - end) * (1 + cos(pi * f)) / 2,   f in [0, 1]

        warm-up ends at step   w = max(warmup_fraction * total_steps - 1, 0)
        step <= w:  lr = cos_anneal(initial, max_lr, step / w)      (max_lr when w = 0)
        step >  w:  lr = cos_anneal(max_lr, initial / final_div_factor,
                                    (step - w) / (total_steps - 1 - w))

    A short warm-up lets Adam's second-moment estimates settle before the large steps; the long
    decay to almost zero lets the weights settle into a minimum at the end.

    The ``max(..., 0)`` and the ``w = 0`` case are the one difference from torch, and only for
    runs of at most ``1 / warmup_fraction`` steps (4 by default). There torch's peak falls at or
    before step 0: at 4 steps it divides 0 by 0 (ZeroDivisionError), at 2 and 3 steps the run
    starts on the decay, below the peak, and a single-step run takes its one step at ``final_lr``
    (4e-6 of the peak for the defaults). Here such a run starts at the peak and decays from it, so
    the schedule is sane for every step count; for runs of more than ``1 / warmup_fraction`` steps
    (5 and more by default) it is torch's exactly.

    Parameters
    ----------
    step : int, 0-based index of the optimiser step about to be taken, 0 <= step < total_steps
    total_steps : int, number of optimiser steps in the whole run
    max_lr : float, the peak learning rate
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step must lie in [0, {total_steps}), got {step}")
    initial_lr = max_lr / div_factor
    final_lr = initial_lr / final_div_factor
    warmup_end = max(warmup_fraction * total_steps - 1, 0.0)
    if step <= warmup_end:
        fraction, start, end = (step / warmup_end if warmup_end > 0 else 1.0), initial_lr, max_lr
    else:
        fraction, start, end = (step - warmup_end) / (total_steps - 1 - warmup_end), max_lr, final_lr
    return end + (start - end) * (1.0 + math.cos(math.pi * fraction)) / 2.0


SCHEDULES = {"constant": constant_lr, "one-cycle": one_cycle_lr}


def learning_rate(schedule: str, step: int, total_steps: int, max_lr: float) -> float:
    """The learning rate of the named schedule (``"constant"`` or ``"one-cycle"``) at ``step``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return SCHEDULES[schedule](step, total_steps, max_lr)


def too_few_steps(schedule: str, total_steps: int) -> str | None:
    """Why ``total_steps`` optimiser steps are too few for the schedule to do its job, or None."""
    if schedule == "one-cycle" and total_steps < ONE_CYCLE_MIN_STEPS:
        return (f"a one-cycle schedule over only {total_steps} optimiser step"
                f"{'s' if total_steps != 1 else ''} (at least {ONE_CYCLE_MIN_STEPS} are needed for "
                f"its warm-up and annealing to mean anything): expect a poorly trained model")
    return None
