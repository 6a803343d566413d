"""Search-space distributions: what one ``trial.suggest_*`` call may return, and how samplers see it.

Three kinds, as in Optuna: ``FloatDistribution`` (optionally log-scaled or on a step grid),
``IntDistribution`` (optionally log-scaled, step >= 1) and ``CategoricalDistribution`` (a tuple of
JSON primitives). Each validates its arguments on construction, so a bad range fails at the
``suggest_*`` call that made it, with the parameter's name in the message.

Samplers that model the objective (the GP) work on the unit cube: ``to_unit`` maps a value to
[0, 1] (log-scaled parameters in log space; integers and stepped floats relaxed to the continuous
interval [low - step/2, high + step/2] so every grid value owns an equal slice) and ``from_unit``
maps back, rounding to the grid. Categoricals are one-hot encoded by the GP and never pass through
``to_unit``.

Storage keeps distributions as JSON (``to_json`` / ``distribution_from_json``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

__all__ = [
    "FloatDistribution", "IntDistribution", "CategoricalDistribution", "Distribution",
    "distribution_from_json", "check_compatible", "CategoricalChoice",
]

CategoricalChoice = Union[None, bool, int, float, str]


def _finite(name: str, what: str, x: float) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"parameter {name!r}: {what} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"parameter {name!r}: {what} must be finite, got {x!r}")
    return v


@dataclass(frozen=True)
class FloatDistribution:
    """A float in [low, high]; ``log=True`` samples uniformly in log space (needs low > 0);
    ``step`` restricts values to low + k * step (not combinable with ``log``)."""

    low: float
    high: float
    log: bool = False
    step: Union[float, None] = None

    @staticmethod
    def make(name: str, low: float, high: float, log: bool = False, step: Union[float, None] = None) -> "FloatDistribution":
        lo, hi = _finite(name, "low", low), _finite(name, "high", high)
        if lo > hi:
            raise ValueError(f"parameter {name!r}: low={lo} must be <= high={hi}")
        if log and step is not None:
            raise ValueError(f"parameter {name!r}: step and log=True cannot be combined")
        if log and lo <= 0:
            raise ValueError(f"parameter {name!r}: log=True needs low > 0, got low={lo}")
        if step is not None:
            step = _finite(name, "step", step)
            if step <= 0:
                raise ValueError(f"parameter {name!r}: step must be > 0, got {step}")
            # Snap high down onto the grid so the largest value is reachable and never exceeded.
            hi = lo + math.floor((hi - lo) / step + 1e-9) * step
        return FloatDistribution(lo, hi, bool(log), step)

    def contains(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if not (self.low - 1e-12 * max(1.0, abs(self.low)) <= v <= self.high + 1e-12 * max(1.0, abs(self.high))):
            return False
        if self.step is not None:
            k = (v - self.low) / self.step
            return abs(k - round(k)) < 1e-6
        return True

    def to_unit(self, v: float) -> float:
        if self.high == self.low:
            return 0.5
        if self.log:
            return (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        if self.step is not None:
            lo, hi = self.low - self.step / 2, self.high + self.step / 2
            return (v - lo) / (hi - lo)
        return (v - self.low) / (self.high - self.low)

    def from_unit(self, u: float) -> float:
        u = min(max(float(u), 0.0), 1.0)
        if self.high == self.low:
            return self.low
        if self.log:
            v = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        elif self.step is not None:
            lo, hi = self.low - self.step / 2, self.high + self.step / 2
            k = round((lo + u * (hi - lo) - self.low) / self.step)
            v = self.low + k * self.step
        else:
            v = self.low + u * (self.high - self.low)
        return min(max(v, self.low), self.high)

    def to_json(self) -> str:
        return json.dumps(dict(kind="float", low=self.low, high=self.high, log=self.log, step=self.step))


@dataclass(frozen=True)
class IntDistribution:
    """An int in [low, high] on the grid low + k * step; ``log=True`` samples in log space (needs
    low >= 1 and step == 1)."""

    low: int
    high: int
    log: bool = False
    step: int = 1

    @staticmethod
    def make(name: str, low: int, high: int, log: bool = False, step: int = 1) -> "IntDistribution":
        for what, x in (("low", low), ("high", high), ("step", step)):
            if isinstance(x, bool) or not isinstance(x, int) and not (isinstance(x, float) and x.is_integer()):
                raise TypeError(f"parameter {name!r}: {what} must be an int, got {x!r}")
        lo, hi, st = int(low), int(high), int(step)
        if lo > hi:
            raise ValueError(f"parameter {name!r}: low={lo} must be <= high={hi}")
        if st < 1:
            raise ValueError(f"parameter {name!r}: step must be >= 1, got {st}")
        if log and st != 1:
            raise ValueError(f"parameter {name!r}: log=True needs step=1, got step={st}")
        if log and lo < 1:
            raise ValueError(f"parameter {name!r}: log=True needs low >= 1, got low={lo}")
        hi = lo + (hi - lo) // st * st
        return IntDistribution(lo, hi, bool(log), st)

    def contains(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int):
            return False
        return self.low <= v <= self.high and (v - self.low) % self.step == 0

    def to_unit(self, v: float) -> float:
        if self.high == self.low:
            return 0.5
        if self.log:
            lo, hi = math.log(self.low - 0.5), math.log(self.high + 0.5)
            return (math.log(v) - lo) / (hi - lo)
        lo, hi = self.low - self.step / 2, self.high + self.step / 2
        return (v - lo) / (hi - lo)

    def from_unit(self, u: float) -> int:
        u = min(max(float(u), 0.0), 1.0)
        if self.high == self.low:
            return self.low
        if self.log:
            lo, hi = math.log(self.low - 0.5), math.log(self.high + 0.5)
            v = round(math.exp(lo + u * (hi - lo)))
        else:
            lo, hi = self.low - self.step / 2, self.high + self.step / 2
            v = self.low + round((lo + u * (hi - lo) - self.low) / self.step) * self.step
        return int(min(max(v, self.low), self.high))

    def to_json(self) -> str:
        return json.dumps(dict(kind="int", low=self.low, high=self.high, log=self.log, step=self.step))


@dataclass(frozen=True)
class CategoricalDistribution:
    """One of ``choices``: a non-empty tuple of distinct JSON primitives (None, bool, int, float, str),
    so that every stored trial round-trips exactly through the database."""

    choices: tuple

    @staticmethod
    def make(name: str, choices: Sequence[CategoricalChoice]) -> "CategoricalDistribution":
        if isinstance(choices, (str, bytes)) or not hasattr(choices, "__iter__"):
            raise TypeError(f"parameter {name!r}: choices must be a sequence, got {choices!r}")
        ch = tuple(choices)
        if not ch:
            raise ValueError(f"parameter {name!r}: choices must not be empty")
        for c in ch:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise TypeError(f"parameter {name!r}: choice {c!r} is a {type(c).__name__}; choices must be "
                                "None, bool, int, float or str (store an index or a name instead)")
            if isinstance(c, float) and not math.isfinite(c):
                raise ValueError(f"parameter {name!r}: choice {c!r} is not finite")
        keys = [_choice_key(c) for c in ch]
        if len(set(keys)) != len(keys):
            raise ValueError(f"parameter {name!r}: choices must be distinct, got {ch!r}")
        return CategoricalDistribution(ch)

    def index(self, v: Any) -> int:
        key = _choice_key(v)
        for i, c in enumerate(self.choices):
            if _choice_key(c) == key:
                return i
        raise ValueError(f"{v!r} is not one of {self.choices!r}")

    def contains(self, v: Any) -> bool:
        try:
            self.index(v)
        except ValueError:
            return False
        return True

    def to_json(self) -> str:
        return json.dumps(dict(kind="categorical", choices=list(self.choices)))


def _choice_key(c: Any) -> tuple:
    # True == 1 and 1 == 1.0 in Python; a categorical must tell them apart.
    return (type(c).__name__, c)


Distribution = Union[FloatDistribution, IntDistribution, CategoricalDistribution]


def distribution_from_json(s: str) -> Distribution:
    d = json.loads(s)
    kind = d.pop("kind")
    if kind == "float":
        return FloatDistribution(**d)
    if kind == "int":
        return IntDistribution(**d)
    if kind == "categorical":
        return CategoricalDistribution(tuple(d["choices"]))
    raise ValueError(f"unknown distribution kind {kind!r} in storage")


def check_compatible(name: str, old: Distribution, new: Distribution, where: str) -> None:
    """Raise if ``new`` may not replace ``old`` for the same parameter name. The kind must stay the
    same and a categorical keeps its choices (the GP's one-hot encoding and every stored trial depend
    on them). Float and int ranges may change between trials (a dynamic space); samplers that model
    the objective then leave that parameter to independent sampling."""
    if type(old) is not type(new):
        raise ValueError(f"parameter {name!r} was suggested as {_kind(old)} in {where} and now as {_kind(new)}; "
                         "a parameter name must keep its kind across trials")
    if isinstance(old, CategoricalDistribution) and old != new:
        raise ValueError(f"parameter {name!r}: categorical choices changed from {list(old.choices)!r} ({where}) to "
                         f"{list(new.choices)!r}; choices must be the same in every trial (use a new name)")


def _kind(d: Distribution) -> str:
    return {FloatDistribution: "a float", IntDistribution: "an int", CategoricalDistribution: "a categorical"}[type(d)]
