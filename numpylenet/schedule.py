"""Learning-rate schedules: the learning rate as a pure function of the step number.

A schedule here is a function ``(step, total_steps) -> lr`` with no state, so a resumed run and
``reference.train`` (which sets torch's learning rate from the same function before each step) use
exactly the same rate at every step.
"""
from __future__ import annotations

import math

__all__ = ["SCHEDULES", "constant_lr", "one_cycle_lr", "learning_rate"]


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

        warm-up ends at step   w = warmup_fraction * total_steps - 1
        step <= w:  lr = cos_anneal(initial, max_lr, step / w)
        step >  w:  lr = cos_anneal(max_lr, initial / final_div_factor,
                                    (step - w) / (total_steps - 1 - w))

    A short warm-up lets Adam's second-moment estimates settle before the large steps; the long
    decay to almost zero lets the weights settle into a minimum at the end.

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
    warmup_end = warmup_fraction * total_steps - 1
    if step <= warmup_end:
        fraction, start, end = step / warmup_end, initial_lr, max_lr
    else:
        fraction, start, end = (step - warmup_end) / (total_steps - 1 - warmup_end), max_lr, final_lr
    return end + (start - end) * (1.0 + math.cos(math.pi * fraction)) / 2.0


SCHEDULES = {"constant": constant_lr, "one-cycle": one_cycle_lr}


def learning_rate(schedule: str, step: int, total_steps: int, max_lr: float) -> float:
    """The learning rate of the named schedule (``"constant"`` or ``"one-cycle"``) at ``step``."""
    return SCHEDULES[schedule](step, total_steps, max_lr)
