"""VirtualEpochs: a training budget in examples, cut into a fixed number of checkpoint intervals.

An epoch (one pass over the data) is a poor unit for checkpoints: its length changes whenever the
data set does, so "epoch 5" of two runs means different amounts of training. A virtual epoch is a
fixed number of optimizer steps instead, derived once from the budget::

    budget_examples = int(stop_point * num_examples)        # stop_point: passes over the data
    steps_per_epoch = budget_examples // (batch_size * num_checkpoints)
    total_steps     = steps_per_epoch * num_checkpoints     # one checkpoint per virtual epoch

When more data arrives, a plan restored from a checkpoint keeps its cadence (``steps_per_epoch``) and
what it has trained (``step``), and the budget stays defined in examples: the grown data set's budget
``int(stop_point * new_num_examples)`` adds ``(new_budget - old_budget) // (batch_size *
steps_per_epoch)`` virtual epochs (fewer, never below what is already trained, if it shrank). So
retraining on new data warm-starts from the checkpoint and keeps checkpointing every
``steps_per_epoch`` steps.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = ["VirtualEpochs", "VirtualEpoch"]


@dataclass(frozen=True)
class VirtualEpoch:
    """Virtual epoch ``index`` covers global optimizer steps ``[start_step, stop_step)``. Iterating it
    yields the step numbers still to run (after a resume, the first one may start part-way)."""

    index: int
    start_step: int
    stop_step: int
    _plan: "VirtualEpochs"

    def __iter__(self) -> Iterator[int]:
        plan = self._plan
        while plan.step < self.stop_step:
            s = plan.step
            plan.step = s + 1  # a yielded step counts as done, like a loader's consumed batch
            yield s

    def __len__(self) -> int:
        return max(0, self.stop_step - max(self.start_step, self._plan.step))


class VirtualEpochs:
    """A checkpoint plan: ``num_checkpoints`` virtual epochs of ``steps_per_epoch`` steps each.

    Args:
        num_examples: training examples available (> 0).
        batch_size: examples per optimizer step (> 0).
        stop_point: how many passes over ``num_examples`` the budget is (> 0, may be fractional).
        num_checkpoints: how many virtual epochs (checkpoints) the budget is cut into (> 0).

    Usage::

        plan = VirtualEpochs(len(data), batch_size=256, stop_point=14.3, num_checkpoints=15)
        state = {"model": model, "opt": opt, "plan": plan, "loader": loader}
        manager.restore(state)                       # no-op on a fresh run
        for epoch in plan:                           # remaining virtual epochs
            for step in epoch:                       # global step numbers
                train_step(next(batches))
            manager.save(state, step=plan.step, metrics=evaluate())

    A step counts as done once it is yielded, so ``state_dict()`` taken in the body of step ``s``
    (or after it) records ``s + 1`` steps done; saving after the body of the last step of a virtual
    epoch records the whole epoch. ``state_dict()`` holds the cadence, progress and the budget it
    was computed from; ``load_state_dict`` into a plan built for a grown data set applies the rule
    in the module docstring. The batch size must stay the same (a step would mean something else).
    """

    def __init__(self, num_examples: int, batch_size: int, stop_point: float, num_checkpoints: int) -> None:
        for name, v in (("num_examples", num_examples), ("batch_size", batch_size),
                        ("num_checkpoints", num_checkpoints)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise ValueError(f"{name} must be an int > 0, got {v!r}")
        if isinstance(stop_point, bool) or not isinstance(stop_point, numbers.Real) \
                or not math.isfinite(stop_point) or stop_point <= 0:
            raise ValueError(f"stop_point must be a finite number > 0 (passes over the data), got {stop_point!r}")
        num_examples, batch_size, num_checkpoints = int(num_examples), int(batch_size), int(num_checkpoints)
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.stop_point = float(stop_point)
        self.num_checkpoints = num_checkpoints
        self.budget_examples = int(self.stop_point * num_examples)
        self.steps_per_epoch = self.budget_examples // (batch_size * num_checkpoints)
        if self.steps_per_epoch == 0:
            raise ValueError(f"a budget of {self.budget_examples} examples (stop_point {stop_point} x {num_examples}) "
                             f"is less than one step of {batch_size} per virtual epoch for {num_checkpoints} "
                             "checkpoints: lower num_checkpoints or batch_size")
        self.num_epochs = num_checkpoints
        self.step = 0

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the whole plan."""
        return self.num_epochs * self.steps_per_epoch

    @property
    def epoch(self) -> int:
        """Index of the virtual epoch the next step belongs to."""
        return self.step // self.steps_per_epoch

    @property
    def examples_seen(self) -> int:
        return self.step * self.batch_size

    @property
    def remaining_steps(self) -> int:
        return max(0, self.total_steps - self.step)

    def __len__(self) -> int:
        """Virtual epochs iteration will still yield (including a partly done one)."""
        return max(0, self.num_epochs - self.epoch)

    def __iter__(self) -> Iterator[VirtualEpoch]:
        while self.step < self.total_steps:
            k = self.epoch
            yield VirtualEpoch(k, k * self.steps_per_epoch, (k + 1) * self.steps_per_epoch, self)
            if self.epoch == k:  # the caller left the epoch early: do not spin on it
                return

    def state_dict(self) -> dict[str, Any]:
        """The plan's inputs, its cadence (``steps_per_epoch``), its length (``num_epochs``), progress
        (``step``: optimizer steps done) and ``budget_examples``: the examples its virtual epochs
        account for (the initial ``int(stop_point * num_examples)``, plus whole virtual epochs added
        by growth)."""
        return {"num_examples": self.num_examples, "batch_size": self.batch_size, "stop_point": self.stop_point,
                "num_checkpoints": self.num_checkpoints, "budget_examples": self.budget_examples,
                "steps_per_epoch": self.steps_per_epoch, "num_epochs": self.num_epochs, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved plan with this plan's data size: keep the saved cadence and progress,
        add (or remove) virtual epochs for the change in budget (in examples)."""
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"the saved plan used batch_size {state['batch_size']}, this one {self.batch_size}: "
                             "the cadence is in steps of one batch, so the batch size must not change")
        spe = int(state["steps_per_epoch"])
        step = int(state["step"])
        budget = int(self.stop_point * self.num_examples)
        extra = (budget - int(state["budget_examples"])) // (self.batch_size * spe)
        done = -(-step // spe)  # virtual epochs started, which cannot be taken back
        self.steps_per_epoch = spe
        self.step = step
        self.budget_examples = int(state["budget_examples"]) + extra * self.batch_size * spe
        self.num_epochs = max(int(state["num_epochs"]) + extra, done)

    def __repr__(self) -> str:
        return (f"VirtualEpochs(steps_per_epoch={self.steps_per_epoch}, num_epochs={self.num_epochs}, "
                f"step={self.step}/{self.total_steps}, batch_size={self.batch_size})")
