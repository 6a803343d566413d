"""The sampler interface, and the search-space helpers that samplers share.

A sampler chooses parameter values in two ways, as in Optuna:

* ``before_trial(study, number, history)`` -> ``{name: value}``: a joint proposal for the part of
  the space it can model (the GP, the Sobol sequence), computed once when the trial starts;
* ``sample_independent(study, number, name, dist, history)`` -> value: for every other parameter.

A sampler with ``exclusive = True`` (the grid) instead fixes all of a new trial's parameters in
``propose_locked(history)``, which runs inside the storage's claim transaction, so two workers never
take the same point. Samplers are pickled into ``n_jobs`` worker processes: keep their state
picklable, and derive randomness from (seed, trial number) so workers never repeat each other.
"""
from __future__ import annotations

import zlib
from typing import Any, Optional, Sequence

import numpy as np

from .space import CategoricalDistribution, Distribution
from .trial import FrozenTrial, TrialState

__all__ = ["Sampler", "intersection_search_space", "trial_rng", "sample_uniform"]


class Sampler:
    """Base class; see the module docstring for the contract."""

    exclusive = False

    def before_trial(self, study: Any, number: int, history: Sequence[FrozenTrial]) -> dict:
        return {}

    def sample_independent(self, study: Any, number: int, name: str, dist: Distribution,
                           history: Sequence[FrozenTrial]) -> Any:
        raise NotImplementedError

    def propose_locked(self, history: Sequence[FrozenTrial]) -> Optional[dict]:
        raise NotImplementedError


def trial_rng(seed: int, number: int, name: str = "") -> np.random.Generator:
    """A random stream that depends only on (seed, trial number, parameter name): trial k gets the
    same values whatever the call order, the process that runs it, or how often the study resumed."""
    return np.random.default_rng([seed & 0xFFFFFFFF, number, zlib.crc32(name.encode())])


def sample_uniform(dist: Distribution, u: float) -> Any:
    """The value at unit coordinate ``u`` in [0, 1): uniform over the (log) range or the grid."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
    return dist.from_unit(u)


def intersection_search_space(history: Sequence[FrozenTrial]) -> dict:
    """The parameters every COMPLETE trial has, with one distribution among them all (name-sorted).
    That is the part of a define-by-run space a joint model can be fitted on."""
    space: Optional[dict] = None
    for t in history:
        if t.state is not TrialState.COMPLETE:
            continue
        if space is None:
            space = dict(t.distributions)
            continue
        space = {k: d for k, d in space.items() if t.distributions.get(k) == d}
    return dict(sorted((space or {}).items()))
