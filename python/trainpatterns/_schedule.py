"""The Trainer's LR schedulers: when they are stepped, and what a resume does to their length.

:class:`SchedulerStepping` steps a scheduler after every optimizer step (``interval="step"``) or
once per virtual epoch (``"epoch"``). A metric-driven scheduler (``ReduceLROnPlateau``) is stepped once
per virtual epoch with the monitored value whatever the interval: its patience counts evaluations,
and only an epoch's end has one. The epoch's step comes after the record is made (its ``lr`` is the
LR the epoch trained with) and before the checkpoint, which then holds the stepped scheduler.

A scheduler's length (``T_max`` of a cosine, ``total_iters`` of a linear, polynomial or constant
schedule) is part of its saved state. A finished run extended with a longer plan restores the old
length over the one the script built, and past its end a cosine climbs back up: :func:`check_length`
warns about it, or, asked to, stretches the schedule to the length the script built and sets the LR
to that schedule's value at the current step (the closed form), so the rest of the run follows the
schedule a run planned at the new length from the start would have had.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch

__all__ = ["INTERVALS", "SchedulerStepping", "check_length", "is_metric_driven", "length_of"]

_LENGTH_ATTRS = ("T_max", "total_iters")
INTERVALS = ("step", "epoch")


def is_metric_driven(scheduler: Any) -> bool:
    """True for schedulers stepped with a metric (``ReduceLROnPlateau``): the Trainer steps them
    once per virtual epoch with the monitored value, the others after every optimizer step."""
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


class SchedulerStepping:
    """Steps ``scheduler`` (None: nothing) at the points ``interval`` names; see the module docstring."""

    def __init__(self, scheduler: Any, interval: str) -> None:
        if interval not in INTERVALS:
            raise ValueError(f"scheduler_interval must be 'step' (after every optimizer step) or 'epoch' (once per "
                             f"virtual epoch), got {interval!r}")
        self.scheduler = scheduler
        self.metric_driven = is_metric_driven(scheduler)
        self.per_step = scheduler is not None and not self.metric_driven and interval == "step"

    def after_step(self) -> None:
        """After an optimizer step."""
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self, value: Optional[float]) -> None:
        """After a virtual epoch's record, ``value`` its monitored figure (a metric-driven
        scheduler skips an epoch without one)."""
        if self.scheduler is None or self.per_step:
            return
        if not self.metric_driven:
            self.scheduler.step()
        elif value is not None:
            self.scheduler.step(value)


def length_of(scheduler: Any) -> Optional[dict]:
    """The scheduler's length attributes (``{"T_max": 1000}``), or None for one without a length
    the Trainer knows how to stretch."""
    if scheduler is None:
        return None
    found = {a: getattr(scheduler, a) for a in _LENGTH_ATTRS if isinstance(getattr(scheduler, a, None), int)}
    return found or None


def check_length(scheduler: Any, built: Optional[dict], total_steps: int, rescale: bool,
                 say: Callable[[str], None]) -> None:
    """After a restore: compare the restored length with ``built`` (the length before the restore,
    as the script made the scheduler). When they differ and the restored schedule ends before the
    plan's ``total_steps``, warn; with ``rescale`` apply ``built`` instead and say so."""
    restored = length_of(scheduler)
    if built is None or restored is None or restored == built:
        return
    name = type(scheduler).__name__
    old = ", ".join(f"{k}={v}" for k, v in restored.items())
    new = ", ".join(f"{k}={v}" for k, v in built.items())
    if rescale:
        closed_form = getattr(scheduler, "_get_closed_form_lr", None)
        if closed_form is None:
            raise ValueError(f"rescale_schedule=True cannot stretch {name}: it has no closed form")
        for attr, value in built.items():
            setattr(scheduler, attr, value)
        lrs = closed_form()
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
        say(f"rescaled the restored {name} from {old} to {new}; the LR is now {scheduler._last_lr[0]:.3g}")
        return
    if max(restored.values()) < total_steps:
        warnings.warn(f"the checkpoint restored {name} with {old}, but this run's plan has {total_steps} steps and "
                      f"the scheduler was built with {new}: past its saved end the LR follows the old schedule "
                      f"(a cosine climbs back up). Pass Trainer(rescale_schedule=True) to continue on the schedule "
                      f"as built", RuntimeWarning, stacklevel=4)
