"""Random search: independent uniform sampling, reproducible by seed; optionally a scrambled Sobol
sequence over the search space (quasi-random: covers the space more evenly than random points).

Trial k's values depend only on (seed, k): a study resumed after a crash, or run by several worker
processes, draws exactly what one uninterrupted process would have drawn.
"""
from __future__ import annotations

import secrets
from typing import Any, Optional, Sequence

import torch

from .base import Sampler, sample_uniform, trial_rng
from .space import Distribution
from .trial import FrozenTrial

__all__ = ["RandomSampler"]


class RandomSampler(Sampler):
    """Uniform random search (log-uniform for ``log=True`` parameters, uniform over grid values for
    ints and stepped floats). ``sobol=True``: the first trial's search space is taken as the space
    and trial k gets point k of a scrambled Sobol sequence (torch.quasirandom.SobolEngine);
    parameters outside that space, and the very first trial, are sampled randomly."""

    def __init__(self, seed: Optional[int] = None, *, sobol: bool = False) -> None:
        self.seed = secrets.randbits(32) if seed is None else int(seed)
        self.sobol = bool(sobol)

    def before_trial(self, study: Any, number: int, history: Sequence[FrozenTrial]) -> dict:
        if not self.sobol:
            return {}
        first = next((t for t in history if t.distributions and t.number != number), None)
        if first is None:
            return {}
        space = dict(sorted(first.distributions.items()))
        engine = torch.quasirandom.SobolEngine(len(space), scramble=True, seed=self.seed & 0x7FFFFFFF)
        if number:
            engine.fast_forward(number)
        u = engine.draw(1, dtype=torch.float64)[0].tolist()
        return {name: sample_uniform(d, ui) for (name, d), ui in zip(space.items(), u)}

    def sample_independent(self, study: Any, number: int, name: str, dist: Distribution,
                           history: Sequence[FrozenTrial]) -> Any:
        return sample_uniform(dist, float(trial_rng(self.seed, number, name).random()))
