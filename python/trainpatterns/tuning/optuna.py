"""Our sampler and pruner inside Optuna studies (``pip install "trainpatterns[optuna]"``).

    import optuna
    from trainpatterns.tuning.optuna import ASHAPruner, GPSampler

    study = optuna.create_study(sampler=GPSampler(seed=0), pruner=ASHAPruner(min_resource=1),
                                storage="sqlite:///tune.db", study_name="mlp", load_if_exists=True)
    study.optimize(objective, n_trials=50)  # an Optuna objective: trial.report(value, step) ...

Optuna keeps what it is good at: its storages (in memory, RDB with PostgreSQL, MySQL or SQLite,
journal files: how a study grows past one machine), its dashboard and its visualisations. The
adapters add the Gaussian-process sampler and the ASHA rule of ``trainpatterns.tuning``, unchanged:

* ``GPSampler`` (an ``optuna.samplers.BaseSampler``) reads the study's trials, converts them to
  our ``FrozenTrial`` (``trainpatterns.tuning.interop``) and asks our ``GPSampler`` for the joint
  proposal. ``infer_relative_search_space`` is the space the GP models (the parameters
  every COMPLETE trial shares; empty during the startup trials), ``sample_relative`` the GP's
  point, fitted to the COMPLETE and the PRUNED trials (at their last reported value, see
  ``trainpatterns.tuning.gp``), with RUNNING trials as fantasies. ``sample_independent`` draws
  every other parameter uniformly from (seed, trial number, name), as our sampler does. With
  the same seed and objective, the adapter proposes what our own study proposes.
* ``ASHAPruner`` (an ``optuna.pruners.BasePruner``) applies our asynchronous successive halving
  rule (``trainpatterns.tuning.asha``) to the trial's intermediate values: the rungs a report
  passes are recorded in the trial's system attribute ``asha_rungs`` (through the storage, as
  Optuna's own pruners record theirs), and the trial stops when it is outside the top
  ``1 / reduction_factor`` of its rung. A NaN or infinite report is the worst value at its rung: the trial stops there. Pause mode (resuming pruned
  trials) has no Optuna counterpart, so it is not offered.

Single-objective studies only; a multi-objective study is refused with a ValueError.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

try:
    import optuna
except ImportError:
    raise ImportError("trainpatterns.tuning.optuna needs Optuna: pip install optuna "
                      "(or pip install \"trainpatterns[optuna]\")") from None

from .asha import ASHAPruner as _ASHA
from .gp import GPSampler as _GP
from .interop import from_optuna_distribution, from_optuna_trial

__all__ = ["GPSampler", "ASHAPruner"]


def _direction(study: optuna.Study) -> str:
    if len(study.directions) != 1:
        raise ValueError(f"trainpatterns.tuning.optuna: study {study.study_name!r} has {len(study.directions)} "
                         "objectives; GPSampler and ASHAPruner support single-objective studies only")
    return "maximize" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"


class GPSampler(optuna.samplers.BaseSampler):
    """Our ``trainpatterns.tuning.GPSampler`` as an Optuna sampler; ``seed`` and ``options`` are
    its arguments (``n_startup_trials``, ``deterministic_objective``, ``learn_from_pruned``, ...)."""

    def __init__(self, seed: Optional[int] = None, **options: Any) -> None:
        self.sampler = _GP(seed, **options)

    @property
    def seed(self) -> int:
        return self.sampler.seed

    def _history(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> tuple[list, list]:
        """(our trials, Optuna's trials) of ``study`` other than ``trial``."""
        theirs = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        return [from_optuna_trial(t) for t in theirs], theirs

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: optuna.trial.FrozenTrial) -> dict[str, optuna.distributions.BaseDistribution]:
        _direction(study)
        ours, theirs = self._history(study, trial)
        space = self.sampler.model_space(ours)
        out: dict = {}
        for t in theirs:  # the space comes from COMPLETE trials, which all hold it with one distribution
            if t.state is optuna.trial.TrialState.COMPLETE:
                out.update((k, d) for k, d in t.distributions.items() if k in space and k not in out)
        return dict(sorted(out.items()))

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        ours, _ = self._history(study, trial)
        proposal = self.sampler.before_trial(SimpleNamespace(direction=_direction(study)), trial.number, ours)
        return {k: v for k, v in proposal.items() if k in search_space}

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        dist = from_optuna_distribution(optuna, param_name, param_distribution)
        return self.sampler.sample_independent(study, trial.number, param_name, dist, ())


class ASHAPruner(optuna.pruners.BasePruner):
    """Our ``trainpatterns.tuning.ASHAPruner`` rule (inline mode) as an Optuna pruner; the arguments
    are its arguments. ``ASHAPruner.for_budget(n_trials, max_resource)`` fits the rungs to a budget."""

    def __init__(self, min_resource: int = 1, reduction_factor: int = 3, min_early_stopping_rate: int = 0, *,
                 max_resource: Optional[int] = None, bootstrap_count: int = 0) -> None:
        self.rule = _ASHA(min_resource, reduction_factor, min_early_stopping_rate, max_resource=max_resource,
                          bootstrap_count=bootstrap_count)

    @classmethod
    def for_budget(cls, n_trials: int, max_resource: int, *, reduction_factor: int = 3,
                   min_complete: int = 3) -> "ASHAPruner":
        """The rungs of ``trainpatterns.tuning.ASHAPruner.for_budget``."""
        rule = _ASHA.for_budget(n_trials, max_resource, reduction_factor=reduction_factor, min_complete=min_complete)
        return cls(rule.min_resource, rule.reduction_factor, max_resource=rule.max_resource)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        sign = -1.0 if _direction(study) == "maximize" else 1.0
        rungs, k = self.rule.record_rungs(trial.intermediate_values, sign,
                                          dict(trial.system_attrs.get("asha_rungs", {})))
        if k is None:
            return False
        # Optuna's pruners keep their per-trial records this way (the storage, by trial id).
        study._storage.set_trial_system_attr(trial._trial_id, "asha_rungs", rungs)
        others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        return self.rule.stops_at(k, rungs[str(k)], others)
