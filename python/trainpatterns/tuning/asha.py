"""ASHA: asynchronous successive halving (Li et al., 2020), the early-stopping rule for trials.

Rungs sit at resources r_k = min_resource * reduction_factor ** (k + min_early_stopping_rate)
(steps or epochs, the ``step`` of ``trial.report(value, step)``). When a trial first reports a
step >= r_k, its value there is recorded as its rung-k value and compared with every rung-k value
seen so far (asynchronous: nobody waits for a full rung). It is promoted (continues) when it ranks within
the top ``max(1, n_k // reduction_factor)`` of the ``n_k`` values at that rung, as Optuna's
SuccessiveHalvingPruner decides; otherwise it is stopped. ``bootstrap_count``: no decision at a rung
until it holds that many values. ``ASHAPruner.for_budget(n_trials, max_resource)`` places the rungs
so that a study of that many trials still finishes several of them.

A NaN or infinite value (a diverging trial's loss) is the worst value there is, in either direction:
it is recorded at the rung as +inf (so it still counts among the rung's values, below every finite
one) and its trial is stopped there, never promoted, whatever the bootstrap count. Between rungs
nothing is decided, as Optuna's SuccessiveHalvingPruner waits for the rung; a trial that recovers a
finite value before its rung is judged on that.

Two modes:

* ``pause=False`` (default): the decision is taken inline; a promoted trial simply keeps running in
  its process. Works with any objective.
* ``pause=True`` (the paper's ASHA): every trial stops at each rung it reaches (PRUNED, marked
  paused). Before a new trial starts, the study looks for a paused trial that now ranks within the
  top ``n_k // reduction_factor`` of its rung (highest rung first) and resumes it instead: same
  number and parameters, ``trial.attempt`` + 1, and the same ``trial.checkpoint_dir``, so an
  objective that saves its state there at every report (and loads it when present) continues from
  the rung instead of restarting. Trials at ``max_resource`` (when given) run to the end.

Pairing with ``trainpatterns.checkpoint.CheckpointManager``: create the manager on
``trial.checkpoint_dir``, save after each ``report``, and restore the latest checkpoint at the top
of the objective when one exists; a trial retried after a crash benefits the same way.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from .trial import FrozenTrial, TrialState

__all__ = ["ASHAPruner"]


class ASHAPruner:
    """Asynchronous successive halving; see the module docstring."""

    def __init__(self, min_resource: int = 1, reduction_factor: int = 3, min_early_stopping_rate: int = 0, *,
                 max_resource: Optional[int] = None, bootstrap_count: int = 0, pause: bool = False) -> None:
        if isinstance(min_resource, bool) or not isinstance(min_resource, int) or min_resource < 1:
            raise ValueError(f"ASHAPruner: min_resource must be an int >= 1, got {min_resource!r}")
        if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) or reduction_factor < 2:
            raise ValueError(f"ASHAPruner: reduction_factor must be an int >= 2, got {reduction_factor!r}")
        if not isinstance(min_early_stopping_rate, int) or min_early_stopping_rate < 0:
            raise ValueError(f"ASHAPruner: min_early_stopping_rate must be an int >= 0, got {min_early_stopping_rate!r}")
        if max_resource is not None and (not isinstance(max_resource, int) or max_resource < min_resource):
            raise ValueError(f"ASHAPruner: max_resource must be an int >= min_resource, got {max_resource!r}")
        if not isinstance(bootstrap_count, int) or bootstrap_count < 0:
            raise ValueError(f"ASHAPruner: bootstrap_count must be an int >= 0, got {bootstrap_count!r}")
        self.min_resource = min_resource
        self.reduction_factor = reduction_factor
        self.min_early_stopping_rate = min_early_stopping_rate
        self.max_resource = max_resource
        self.bootstrap_count = bootstrap_count
        self.pause = bool(pause)
        self._direction = "minimize"

    @classmethod
    def for_budget(cls, n_trials: int, max_resource: int, *, reduction_factor: int = 3,
                   min_complete: int = 3) -> "ASHAPruner":
        """An inline pruner whose rungs fit a study of ``n_trials`` trials of ``max_resource`` steps.

        About one trial in ``reduction_factor ** R`` gets through R rungs, so R is the largest
        number of rungs that leaves ``min_complete`` or more trials to finish
        (``n_trials / reduction_factor ** R >= min_complete``; R = 0, no pruning at all, for a
        budget below ``min_complete * reduction_factor``; fewer when ``max_resource`` is below
        ``reduction_factor ** R``). The top rung sits at ``max_resource / reduction_factor`` (rounded
        up to a rung of the ladder), the others a factor apart below it: a trial is judged
        on as much of its training as the rungs allow, and never at a step so early that the
        ranking says little about the end. (Rungs at 30, 90 and 270 of 300 steps let about one trial
        of 12 finish, and the sampler then has one result to learn from.)"""
        for name, value, low in (("n_trials", n_trials, 1), ("max_resource", max_resource, 1),
                                 ("reduction_factor", reduction_factor, 2), ("min_complete", min_complete, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ASHAPruner.for_budget: {name} must be an int >= {low}, got {value!r}")
        rungs = 0
        while n_trials >= min_complete * reduction_factor ** (rungs + 1):
            rungs += 1
        # Rounded up, so the rung above the top one lands at or past max_resource (no extra rung
        # just short of the end when max_resource is not a multiple of the factor's power).
        return cls(max(1, -(-max_resource // reduction_factor ** rungs)), reduction_factor, max_resource=max_resource)

    def rung_resource(self, k: int) -> int:
        """The resource (step) of rung k."""
        return self.min_resource * self.reduction_factor ** (k + self.min_early_stopping_rate)

    def _rungs_reached(self, step: int) -> int:
        """How many rungs a trial at ``step`` has passed (rungs at or above max_resource excluded:
        nothing is stopped there)."""
        k = 0
        while self.rung_resource(k) <= step and (self.max_resource is None or self.rung_resource(k) < self.max_resource):
            k += 1
        return k

    def _sign(self, study: Any) -> float:
        return -1.0 if getattr(study, "direction", "minimize") == "maximize" else 1.0

    def _promotable(self, value: float, rung_values: Sequence[float]) -> bool:
        """Within the top max(1, n // eta) of ``rung_values`` (which includes ``value``); lower is better,
        and a non-finite value is never promotable, even when it is alone at its rung."""
        if not math.isfinite(value):
            return False
        ranked = sorted(rung_values)
        cut = ranked[max(1, len(ranked) // self.reduction_factor) - 1]
        return value <= cut

    @staticmethod
    def _rung_values(trials: Sequence[Any], k: int) -> list:
        out = []
        for t in trials:
            v = t.system_attrs.get("asha_rungs", {}).get(str(k))
            if v is not None:
                out.append(v)
        return out

    def record_rungs(self, intermediate_values: dict, sign: float, rungs: dict) -> tuple[dict, Optional[int]]:
        """The rung record ``rungs`` ({str(k): signed value}) of a trial whose reports are
        ``intermediate_values``, with the rungs its last report passed added at the last value; and
        the newest rung added, or None when the last report passed no new rung. A non-finite last
        value is recorded as +inf, the worst (JSON keeps it: Python's json and Optuna's storages
        write it as Infinity)."""
        step = max(intermediate_values)
        value = sign * intermediate_values[step]
        if not math.isfinite(value):
            value = math.inf
        new = [k for k in range(self._rungs_reached(step)) if str(k) not in rungs]
        if not new:
            return rungs, None
        return {**rungs, **{str(k): value for k in new}}, new[-1]

    def stops_at(self, k: int, value: float, others: Sequence[Any]) -> bool:
        """Whether a trial with the signed rung-``k`` ``value`` stops there, given the rung records
        (``system_attrs["asha_rungs"]``) of the study's other trials ``others`` (inline mode)."""
        values = self._rung_values(others, k) + [value]
        if len(values) < self.bootstrap_count and math.isfinite(value):
            return False
        return not self._promotable(value, values)

    def should_prune(self, study: Any, trial: Any, trials: Sequence[FrozenTrial]) -> bool:
        """Called by ``trial.should_prune()`` with the study's trials as stored."""
        rungs, k = self.record_rungs(trial.intermediate_values, self._sign(study),
                                     trial.system_attrs.get("asha_rungs", {}))
        if k is None:
            return False
        trial._set_system_attr("asha_rungs", rungs)
        if self.pause:
            trial._set_system_attr("asha_paused", k)
            return True
        return self.stops_at(k, rungs[str(k)], [t for t in trials if t.number != trial.number])

    def promote_locked(self, trials: Sequence[FrozenTrial]) -> Optional[int]:
        """(pause mode) The number of a paused trial to resume now, or None. Called by the storage
        inside its claim transaction, so two workers never resume the same trial."""
        if not self.pause:
            return None
        top_rung = max((int(k) for t in trials for k in t.system_attrs.get("asha_rungs", {})), default=-1)
        for k in range(top_rung, -1, -1):
            values = self._rung_values(trials, k)
            if len(values) < max(self.bootstrap_count, 1):
                continue
            n_promote = len(values) // self.reduction_factor
            if n_promote == 0:
                continue
            cut = sorted(values)[n_promote - 1]

            def at_rung(t: FrozenTrial) -> float:
                return t.system_attrs.get("asha_rungs", {}).get(str(k), math.inf)

            for t in sorted(trials, key=at_rung):
                if (t.state is TrialState.PRUNED and t.system_attrs.get("asha_paused") == k
                        and math.isfinite(at_rung(t)) and at_rung(t) <= cut):
                    return t.number
        return None
