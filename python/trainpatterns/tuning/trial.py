"""Trials: the live ``Trial`` an objective receives, and ``FrozenTrial``, a finished or stored one.

``Trial`` is define-by-run (as in Optuna): ``suggest_float`` / ``suggest_int`` /
``suggest_categorical`` return a value for a named parameter, chosen by the study's sampler unless
it is fixed (an enqueued trial, a grid point, a retried or promoted trial keeps the values it had).
Every suggestion and report is written to storage at once, so a trial of a killed process is
retried with the same parameters and ``checkpoint_dir``.

A trial reaches its study only through ``TrialRecorder`` (``Study`` implements it): the sampler's
choices, the pruner's verdict, and writes of the trial's state to storage.

Invariants: a parameter name keeps its kind (float / int / categorical) and, for categoricals, its
choices across all trials of a study; suggesting the same name twice in one trial returns the same
value. ``report(value, step)`` takes Optuna's order: a number, then the step (the training step
or epoch: a resource count, an int >= 0). A float step is refused rather than truncated, so a call
written in the other order with a float value fails instead of swapping the two. NaN and infinite
values are stored as reported, as Optuna stores them: a diverging trial reports what it sees, and
ASHA ranks a non-finite value as the worst at its rung.
"""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from .space import (CategoricalChoice, CategoricalDistribution, Distribution, FloatDistribution,
                    IntDistribution, check_compatible)

__all__ = ["TrialState", "FrozenTrial", "Trial", "TrialPruned", "TrialRecorder"]


class TrialState(enum.Enum):
    """WAITING: queued (enqueued, or interrupted and due for a retry). RUNNING: claimed by a live
    process. COMPLETE: returned a finite value. PRUNED: stopped by the pruner (or paused at an ASHA
    rung, from where it may be promoted). FAILED: raised, returned a non-finite value, or was
    interrupted more than ``max_retries`` times; ``fail_reason`` says which. ``FAIL`` is another
    name for ``FAILED`` (Optuna's spelling)."""

    WAITING = 0
    RUNNING = 1
    COMPLETE = 2
    PRUNED = 3
    FAILED = 4
    FAIL = 4

    def is_finished(self) -> bool:
        return self in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED)


class TrialPruned(Exception):
    """Raise from the objective when ``trial.should_prune()`` is True: the trial ends as PRUNED."""


@dataclass
class FrozenTrial:
    """A snapshot of one stored trial. ``params`` are the external values the objective received;
    ``intermediate_values`` maps step -> reported value; ``value`` is set for COMPLETE trials (and
    for PRUNED ones: the last reported value)."""

    number: int
    state: TrialState
    value: Optional[float]
    params: dict
    distributions: dict
    intermediate_values: dict = field(default_factory=dict)
    user_attrs: dict = field(default_factory=dict)
    system_attrs: dict = field(default_factory=dict)
    attempts: int = 0
    datetime_start: Optional[float] = None
    datetime_complete: Optional[float] = None

    @property
    def fail_reason(self) -> Optional[str]:
        return self.system_attrs.get("fail_reason")

    @property
    def duration(self) -> Optional[float]:
        """Seconds from the first start to completion (None while unfinished)."""
        if self.datetime_start is None or self.datetime_complete is None:
            return None
        return self.datetime_complete - self.datetime_start

    @property
    def last_step(self) -> Optional[int]:
        return max(self.intermediate_values) if self.intermediate_values else None


class TrialRecorder(Protocol):
    """What a live ``Trial`` needs from its study. ``number`` is the trial's number; ``history`` the
    study's other trials as read when the trial was claimed. Each ``record_*`` call stores the whole
    mapping it is given (it replaces the stored one), immediately, so a retried trial sees it."""

    @property
    def artifact_dir(self) -> Path:
        """The directory under which every trial gets its own ``checkpoint_dir``."""
        ...

    def propose_params(self, number: int, history: Sequence[FrozenTrial]) -> dict:
        """The sampler's joint proposal {name: value} for a trial that is starting."""
        ...

    def sample_param(self, number: int, name: str, dist: Distribution, history: Sequence[FrozenTrial]) -> Any:
        """The sampler's value for one parameter outside the joint proposal."""
        ...

    def record_params(self, number: int, params: dict, distributions: dict) -> None:
        """``params``: name -> the value the objective received; ``distributions``: name -> its
        ``Distribution``."""
        ...

    def record_intermediate(self, number: int, values: dict) -> None:
        """``values``: step -> reported value."""
        ...

    def record_attrs(self, number: int, *, user_attrs: Optional[dict] = None,
                     system_attrs: Optional[dict] = None) -> None:
        """Store the attrs that are given (None: leave that mapping as stored)."""
        ...

    def ask_pruner(self, trial: "Trial") -> bool:
        """The pruner's verdict on ``trial`` at its last report (False without a pruner)."""
        ...


def _known_distributions(history: Sequence[FrozenTrial]) -> dict:
    """{name: (distribution, "trial k")}: each parameter's distribution in the first trial of
    ``history`` that has it, with where it came from (for the compatibility error message)."""
    known: dict = {}
    for t in history:
        for name, d in t.distributions.items():
            known.setdefault(name, (d, f"trial {t.number}"))
    return known


class Trial:
    """The live trial handed to ``objective(trial)``. Created by ``Study.ask()`` / ``optimize``;
    ``study`` is the study it belongs to (a ``TrialRecorder``)."""

    def __init__(self, study: TrialRecorder, frozen: FrozenTrial, history: Sequence[FrozenTrial]) -> None:
        self.study = study
        self._frozen = frozen
        self.number = frozen.number
        self._history = list(history)
        self._params: dict = dict(frozen.params)
        self._dists: dict = dict(frozen.distributions)
        self._fixed: dict = dict(frozen.system_attrs.get("fixed_params", {}))
        self._fixed.update(frozen.params)  # a retried/promoted trial keeps what it already had
        self._intermediate: dict = dict(frozen.intermediate_values)
        self._user_attrs: dict = dict(frozen.user_attrs)
        self._system_attrs: dict = dict(frozen.system_attrs)
        self._known = _known_distributions(self._history)
        self._proposal: dict = study.propose_params(self.number, self._history)

    # ----- what the objective reads ----------------------------------------------------------------

    @property
    def params(self) -> dict:
        return dict(self._params)

    @property
    def distributions(self) -> dict:
        return dict(self._dists)

    @property
    def attempt(self) -> int:
        """1 on the first run of this trial, 2+ when it is retried after a crash or resumed after an
        ASHA promotion: then ``checkpoint_dir`` holds whatever the previous attempt saved."""
        return self._frozen.attempts

    @property
    def checkpoint_dir(self) -> Path:
        """A directory that belongs to this trial (created on first access), under the study's
        artifact directory. Save training state there with
        ``trainpatterns.checkpoint.CheckpointManager(trial.checkpoint_dir)`` and restore it at the
        start: a retried or promoted trial then continues instead of restarting. (Not a pickle read
        back with ``torch.load``: a file planted in the artifact directory would run its code.)"""
        d = self.study.artifact_dir / f"trial_{self.number:05d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def intermediate_values(self) -> dict:
        return dict(self._intermediate)

    @property
    def user_attrs(self) -> dict:
        return dict(self._user_attrs)

    @property
    def system_attrs(self) -> dict:
        return dict(self._system_attrs)

    def set_user_attr(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value with the trial."""
        self._user_attrs[str(key)] = value
        self.study.record_attrs(self.number, user_attrs=self._user_attrs)

    def _set_system_attr(self, key: str, value: Any) -> None:
        self._system_attrs[key] = value
        self.study.record_attrs(self.number, system_attrs=self._system_attrs)

    def _record_start(self, sampler_seconds: float) -> None:
        """Store the sampler's time and its joint proposal (``system_attrs["proposal"]``): other
        workers' GP proposals treat this RUNNING trial as pending at that point, before the
        objective has suggested anything (the study drops it when the trial finishes)."""
        self._system_attrs["sampler_seconds"] = sampler_seconds
        if self._proposal:
            self._system_attrs["proposal"] = dict(self._proposal)
        self.study.record_attrs(self.number, system_attrs=self._system_attrs)

    # ----- suggestions -----------------------------------------------------------------------------

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False,
                      step: Optional[float] = None) -> float:
        """A float in [low, high] (log-uniform with ``log=True``; on low + k*step with ``step``)."""
        return float(self._suggest(name, FloatDistribution.make(name, low, high, log, step)))

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False, step: int = 1) -> int:
        """An int in [low, high] on low + k*step (log-uniform with ``log=True``)."""
        return int(self._suggest(name, IntDistribution.make(name, low, high, log, step)))

    def suggest_categorical(self, name: str, choices: Sequence[CategoricalChoice]) -> CategoricalChoice:
        """One of ``choices`` (JSON primitives; the same choices in every trial)."""
        return self._suggest(name, CategoricalDistribution.make(name, choices))

    def _suggest(self, name: str, dist: Distribution) -> Any:
        if not isinstance(name, str) or not name:
            raise TypeError(f"parameter names must be non-empty strings, got {name!r}")
        if name in self._known:
            old, where = self._known[name]
            check_compatible(name, old, dist, where)
        if name in self._dists:
            check_compatible(name, self._dists[name], dist, f"trial {self.number}")
            if name in self._params and dist.contains(self._params[name]):
                self._dists[name] = dist
                return self._params[name]
        if name in self._fixed:
            value = self._fixed[name]
            if isinstance(dist, IntDistribution) and isinstance(value, float) and value.is_integer():
                value = int(value)
            if not dist.contains(value):
                raise ValueError(f"parameter {name!r}: the fixed value {value!r} of trial {self.number} "
                                 f"(enqueued, grid or earlier attempt) is outside {dist}")
            if isinstance(dist, FloatDistribution):
                value = float(value)
        elif name in self._proposal and dist.contains(self._proposal[name]):
            value = self._proposal[name]
        else:
            value = self.study.sample_param(self.number, name, dist, self._history)
        self._params[name] = value
        self._dists[name] = dist
        self.study.record_params(self.number, self._params, self._dists)
        return value

    # ----- early stopping --------------------------------------------------------------------------

    def report(self, value: float, step: int) -> None:
        """Record the objective's intermediate ``value`` (a number; NaN and infinities are kept, as
        Optuna keeps them) at ``step`` (an int >= 0), in Optuna's order. Reporting a step again
        overwrites it (a resumed trial repeating a step)."""
        if isinstance(value, (str, bytes, bool)):
            raise TypeError(f"report(value, step): value must be a number, got {value!r}")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"report(value, step): value must be a number, got {value!r}") from None
        try:
            s = operator.index(step)  # ints and integer scalars only: a float step is refused, not truncated
        except TypeError:
            s = None
        if s is None or isinstance(step, bool):
            raise TypeError(f"report(value, step): step must be an int (the resource used so far), got {step!r}; "
                            "note the order: value first, then step")
        if s < 0:
            raise ValueError(f"report(value, step): step must be >= 0, got {s}")
        self._intermediate[s] = v
        self.study.record_intermediate(self.number, self._intermediate)

    def should_prune(self) -> bool:
        """Ask the study's pruner whether to stop now (raise ``TrialPruned`` if so). Without a pruner,
        or before any report, always False, whatever was reported (as with Optuna's NopPruner): a NaN
        or infinite value is the pruner's to judge (ASHA stops it at the trial's next rung)."""
        if not self._intermediate:
            return False
        return bool(self.study.ask_pruner(self))

    def __repr__(self) -> str:
        return f"Trial(number={self.number}, params={self._params!r})"
