"""Grid search over a static space: the cartesian product of listed values, each point exactly once.

Points are handed out in cartesian order (the last name varies fastest) inside the storage's claim
transaction, so several processes never take the same point and a resumed study continues with the
first point no trial has taken yet. A point whose trial failed is not retried (it was covered); a
point whose process died is retried, as every interrupted trial is. The study stops when the grid
is exhausted.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Optional, Sequence

from .base import Sampler
from .space import CategoricalDistribution, Distribution
from .trial import FrozenTrial

__all__ = ["GridSampler"]


class GridSampler(Sampler):
    """``GridSampler({"lr": [1e-3, 1e-2], "width": [32, 64, 128]})``: 6 trials. The objective must
    suggest exactly these names, each with a range that contains its grid values."""

    exclusive = True

    def __init__(self, search_space: Mapping[str, Sequence[Any]]) -> None:
        if not isinstance(search_space, Mapping):
            raise TypeError(f"GridSampler: search_space must be a dict name -> list of values, got {search_space!r}")
        if not search_space:
            raise ValueError("GridSampler: the search space is empty")
        space = {}
        for name, values in search_space.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"GridSampler: parameter names must be non-empty strings, got {name!r}")
            if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
                raise TypeError(f"GridSampler: values of {name!r} must be a list, got {values!r}")
            vals = list(values)
            if not vals:
                raise ValueError(f"GridSampler: parameter {name!r} has no values")
            # Reuse the categorical checks: JSON primitives, finite, distinct.
            CategoricalDistribution.make(name, vals)
            space[name] = vals
        self.search_space = space
        self.n_points = math.prod(len(v) for v in space.values())

    def points(self) -> list[dict]:
        names = list(self.search_space)
        return [dict(zip(names, combo)) for combo in itertools.product(*self.search_space.values())]

    def propose_locked(self, history: Sequence[FrozenTrial]) -> Optional[dict]:
        taken = {_key(t.system_attrs["fixed_params"]) for t in history if "fixed_params" in t.system_attrs}
        for p in self.points():
            if _key(p) not in taken:
                return p
        return None

    def sample_independent(self, study: Any, number: int, name: str, dist: Distribution,
                           history: Sequence[FrozenTrial]) -> Any:
        raise ValueError(f"parameter {name!r} is not in the grid (grid parameters: {list(self.search_space)}); "
                         "add it to GridSampler's search space")


def _key(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, type(v).__name__, v) for k, v in params.items()))
