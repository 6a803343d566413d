"""Trials in other libraries' shapes: Optuna's ``FrozenTrial`` and storages, and pandas DataFrames.

Optuna's trial has every field ours has except the attempt count, which travels in its system attrs
under ``trainpatterns:attempts``. States map one to one (our FAILED is Optuna's FAIL); a PRUNED
trial's value is its last reported one in both. Times are ours as seconds since the epoch and
Optuna's as naive local datetimes (what its dashboard shows), so a round trip keeps them to the
microsecond. Distributions convert field by field (both libraries have the same three kinds with
the same meaning), with one seam: Optuna snaps the top of a stepped float range in decimal
(low + k * step written out in digits), and refuses a value above it, where ours computes
low + k * step in binary floating point, which can land one unit in the last place higher. Export
therefore gives Optuna its decimal top and clips values to it, and import rebuilds each distribution
with our own ``make`` (what ``suggest_*`` would build), so a round trip keeps every distribution
and every value except such a top value, which comes back as Optuna's (within 1e-15 relative).
Optuna and pandas are imported only here, and only when called.
"""
from __future__ import annotations

import datetime
from decimal import Decimal
from typing import Any, Optional, Sequence

from .space import CategoricalDistribution, Distribution, FloatDistribution, IntDistribution
from .trial import FrozenTrial, TrialState

__all__ = ["DATAFRAME_ATTRS", "trials_dataframe", "to_optuna_trial", "from_optuna_trial", "from_optuna_distribution",
           "export_study", "read_optuna_study"]

ATTEMPTS_KEY = "trainpatterns:attempts"
DATAFRAME_ATTRS = ("number", "value", "datetime_start", "datetime_complete", "duration", "params", "user_attrs",
                   "system_attrs", "state")
_TRIAL_ATTRS = frozenset(DATAFRAME_ATTRS) | {"distributions", "intermediate_values", "attempts", "fail_reason",
                                             "last_step"}


def _optuna(what: str) -> Any:
    try:
        import optuna
    except ImportError:
        raise ImportError(f"{what} needs Optuna: pip install optuna") from None
    return optuna


def _datetime(t: Optional[float]) -> Optional[datetime.datetime]:
    return None if t is None else datetime.datetime.fromtimestamp(t)


def _seconds(d: Optional[datetime.datetime]) -> Optional[float]:
    return None if d is None else d.timestamp()


# ----- pandas -----------------------------------------------------------------------------------------

def trials_dataframe(trials: Sequence[FrozenTrial], attrs: tuple, multi_index: bool) -> Any:
    """Optuna's ``trials_dataframe`` layout: dict attrs spread over (attr, key) columns sorted by key,
    times as datetimes, ``duration`` a timedelta, ``state`` its name; flat names join with "_"."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("Study.trials_dataframe() needs pandas: pip install pandas") from None
    unknown = [a for a in attrs if a not in _TRIAL_ATTRS]
    if unknown:
        raise ValueError(f"trials_dataframe: unknown attrs {unknown}; choose from {sorted(_TRIAL_ATTRS)}")
    if not trials:
        return pd.DataFrame()
    records, columns = [], {a: set() for a in attrs}
    for t in trials:
        start, complete = _datetime(t.datetime_start), _datetime(t.datetime_complete)
        record = {}
        for a in attrs:
            if a in ("datetime_start", "datetime_complete"):
                v: Any = start if a == "datetime_start" else complete
            elif a == "duration":
                v = None if start is None or complete is None else complete - start
            else:
                v = getattr(t, a)
            if isinstance(v, TrialState):
                v = v.name
            pairs = v.items() if isinstance(v, dict) else (("", v),)
            for key, x in pairs:
                record[(a, key)] = x
                columns[a].add((a, key))
        records.append(record)
    ordered = [c for a in attrs for c in sorted(columns[a])]
    df = pd.DataFrame(records, columns=pd.MultiIndex.from_tuples(ordered))
    if not multi_index:
        df.columns = ["_".join(str(p) for p in c if p != "") for c in ordered]
    return df


# ----- Optuna: distributions and trials -----------------------------------------------------------------

def _to_optuna_distribution(optuna: Any, d: Distribution) -> Any:
    od = optuna.distributions
    if isinstance(d, FloatDistribution) and d.step is not None:
        k = round((d.high - d.low) / d.step)
        top = float(Decimal(str(d.low)) + k * Decimal(str(d.step)))  # the top Optuna keeps unchanged
        return od.FloatDistribution(d.low, top, step=d.step)
    if isinstance(d, FloatDistribution):
        return od.FloatDistribution(d.low, d.high, log=d.log, step=d.step)
    if isinstance(d, IntDistribution):
        return od.IntDistribution(d.low, d.high, log=d.log, step=d.step)
    return od.CategoricalDistribution(list(d.choices))


def _to_optuna_value(optuna_dist: Any, v: Any) -> Any:
    """``v`` clipped into a stepped float's decimal range (see the module docstring)."""
    if getattr(optuna_dist, "step", None) is not None and isinstance(v, float):
        return min(max(v, optuna_dist.low), optuna_dist.high)
    return v


def from_optuna_distribution(optuna: Any, name: str, d: Any) -> Distribution:
    od = optuna.distributions
    if isinstance(d, od.FloatDistribution):
        return FloatDistribution.make(name, d.low, d.high, d.log, d.step)
    if isinstance(d, od.IntDistribution):
        return IntDistribution.make(name, d.low, d.high, d.log, d.step)
    if isinstance(d, od.CategoricalDistribution):
        return CategoricalDistribution.make(name, d.choices)
    raise ValueError(f"parameter {name!r}: Optuna distribution {d!r} has no trainpatterns equivalent")


def to_optuna_trial(t: FrozenTrial) -> Any:
    """Our trial as an ``optuna.trial.FrozenTrial`` (for ``Study.add_trial``). A trial that is not
    finished carries no completion time there (Optuna refuses one)."""
    optuna = _optuna("export to Optuna")
    state = optuna.trial.TrialState.FAIL if t.state is TrialState.FAILED else optuna.trial.TrialState[t.state.name]
    dists = {k: _to_optuna_distribution(optuna, d) for k, d in t.distributions.items()}
    return optuna.trial.FrozenTrial(
        number=t.number, state=state, value=t.value, datetime_start=_datetime(t.datetime_start),
        datetime_complete=_datetime(t.datetime_complete) if t.state.is_finished() else None,
        params={k: _to_optuna_value(dists[k], v) for k, v in t.params.items()}, distributions=dists,
        user_attrs=dict(t.user_attrs), system_attrs={**t.system_attrs, ATTEMPTS_KEY: t.attempts},
        intermediate_values=dict(t.intermediate_values), trial_id=t.number)


def from_optuna_trial(ft: Any) -> FrozenTrial:
    """An ``optuna.trial.FrozenTrial`` as ours (single-objective)."""
    optuna = _optuna("import from Optuna")
    system = dict(ft.system_attrs)
    default_attempts = 0 if ft.state == optuna.trial.TrialState.WAITING else 1
    return FrozenTrial(
        number=int(ft.number), state=TrialState[ft.state.name], value=None if ft.value is None else float(ft.value),
        params=dict(ft.params),
        distributions={k: from_optuna_distribution(optuna, k, d) for k, d in ft.distributions.items()},
        intermediate_values={int(k): float(v) for k, v in ft.intermediate_values.items()},
        user_attrs=dict(ft.user_attrs), system_attrs=system, attempts=int(system.pop(ATTEMPTS_KEY, default_attempts)),
        datetime_start=_seconds(ft.datetime_start), datetime_complete=_seconds(ft.datetime_complete))


# ----- Optuna: whole studies ------------------------------------------------------------------------------

def export_study(trials: Sequence[FrozenTrial], direction: str, storage: Any, study_name: str) -> Any:
    """A new Optuna study ``study_name`` in ``storage`` holding ``trials``; returns it. All trials are
    converted (and so checked) before the study is created."""
    optuna = _optuna("Study.export_to_optuna")
    converted = [to_optuna_trial(t) for t in trials]
    study = optuna.create_study(storage=storage, study_name=study_name, direction=direction)
    study.add_trials(converted)
    return study


def read_optuna_study(storage: Any, study_name: str) -> tuple[str, list[FrozenTrial]]:
    """(direction, trials) of the single-objective Optuna study ``study_name`` in ``storage``."""
    optuna = _optuna("import_from_optuna")
    study = optuna.load_study(study_name=study_name, storage=storage)
    if len(study.directions) != 1:
        raise ValueError(f"Optuna study {study_name!r} has {len(study.directions)} objectives; trainpatterns "
                         "studies have one")
    direction = "maximize" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"
    return direction, [from_optuna_trial(t) for t in study.get_trials(deepcopy=False)]
