"""trainpatterns.tuning.optuna: our GPSampler and ASHAPruner inside real Optuna studies (in-memory
and SQLite RDB storage), checked against our own study run on the same objective, seeds and curves,
and against Optuna's RandomSampler on Branin.
"""
from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

optuna = pytest.importorskip("optuna")
pytest.importorskip("sqlalchemy")  # Optuna's RDB storage

import trainpatterns  # noqa: E402
from trainpatterns.tuning import (ASHAPruner, GPSampler, RandomSampler, TrialPruned, TrialState,  # noqa: E402
                                  create_study)
from trainpatterns.tuning import optuna as tp_optuna  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.ERROR)

BRANIN_MIN = 0.397887357729738


def branin_xy(x: float, y: float) -> float:
    return ((y - 5.1 / (4 * math.pi ** 2) * x * x + 5 / math.pi * x - 6) ** 2
            + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x) + 10)


def branin(trial) -> float:
    return branin_xy(trial.suggest_float("x", -5.0, 10.0), trial.suggest_float("y", 0.0, 15.0))


def _storage(kind: str, tmp_path: Path, name: str):
    return None if kind == "memory" else f"sqlite:///{tmp_path / name}.db"


STORAGES = ["memory", "sqlite"]


# ----- GPSampler ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("storage", STORAGES)
def test_gp_sampler_in_optuna_matches_our_study_and_beats_random_on_branin(storage, tmp_path):
    # Same N and seeds for all three. Stated margin: the adapter's median regret is within 5% (plus
    # 1e-9) of our own study's; it is in fact the same run, so the trials are also compared one by one.
    n_trials, seeds = 30, range(3)
    ours, adapter, random = [], [], []
    for seed in seeds:
        s = create_study(sampler=GPSampler(seed=seed, deterministic_objective=True))
        s.optimize(branin, n_trials=n_trials)
        o = optuna.create_study(sampler=tp_optuna.GPSampler(seed=seed, deterministic_objective=True),
                                storage=_storage(storage, tmp_path, f"gp{seed}"), study_name=f"gp{seed}")
        o.optimize(branin, n_trials=n_trials)
        r = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        r.optimize(branin, n_trials=n_trials)
        assert [t.params for t in o.trials] == [t.params for t in s.trials]
        assert [t.value for t in o.trials] == [t.value for t in s.trials]
        assert all(t.state is optuna.trial.TrialState.COMPLETE for t in o.trials)
        ours.append(s.best_value - BRANIN_MIN)
        adapter.append(o.best_value - BRANIN_MIN)
        random.append(r.best_value - BRANIN_MIN)
    med_ours, med_adapter, med_random = (statistics.median(v) for v in (ours, adapter, random))
    assert med_adapter <= 1.05 * med_ours + 1e-9, (adapter, ours)
    assert med_adapter < med_random / 10, (adapter, random)


def mixed_conditional(trial) -> float:
    """Mixed kinds, maximised, with a parameter ("tail") only some trials suggest: it stays outside
    the relative space and goes through sample_independent."""
    a = trial.suggest_float("a", 1e-3, 1.0, log=True)
    b = trial.suggest_int("b", -3, 7, step=2)
    c = trial.suggest_categorical("c", ["p", "q", None, 3])
    v = -(math.log(a) ** 2) - (b - 3) ** 2 - (0.0 if c == "q" else 1.0)
    if b > 0:
        v -= trial.suggest_float("tail", 0.0, 1.0)
    return v


@pytest.mark.parametrize("storage", STORAGES)
def test_gp_sampler_relative_and_independent_sampling_match_ours(storage, tmp_path):
    s = create_study(direction="maximize", sampler=GPSampler(seed=3, n_startup_trials=4))
    s.optimize(mixed_conditional, n_trials=14)
    sampler = tp_optuna.GPSampler(seed=3, n_startup_trials=4)
    o = optuna.create_study(direction="maximize", sampler=sampler, storage=_storage(storage, tmp_path, "mixed"))
    o.optimize(mixed_conditional, n_trials=14)
    assert [t.params for t in o.trials] == [t.params for t in s.trials]
    assert any("tail" in t.params for t in o.trials) and any("tail" not in t.params for t in o.trials)
    # The relative space is what our GP models: the parameters every COMPLETE trial shares.
    space = sampler.infer_relative_search_space(o, o.trials[-1])
    assert list(space) == ["a", "b", "c"]
    assert space["b"] == optuna.distributions.IntDistribution(-3, 7, step=2)


def test_gp_sampler_startup_relative_space_is_empty_and_multi_objective_is_refused():
    sampler = tp_optuna.GPSampler(seed=0, n_startup_trials=5)
    o = optuna.create_study(sampler=sampler)
    o.optimize(branin, n_trials=3)
    assert sampler.infer_relative_search_space(o, o.trials[-1]) == {}
    multi = optuna.create_study(directions=["minimize", "minimize"], sampler=tp_optuna.GPSampler(seed=0))
    with pytest.raises(ValueError, match="2 objectives.*single-objective"):
        multi.optimize(lambda t: (branin(t), 0.0), n_trials=1)


# ----- ASHAPruner --------------------------------------------------------------------------------------

def _run_ours(curves, direction, kw):
    def objective(trial):
        row = curves[trial.number]
        for step, v in enumerate(row, 1):
            trial.report(value=v, step=step)
            if trial.should_prune():
                raise TrialPruned()
        return row[-1]

    s = create_study(direction=direction, sampler=RandomSampler(seed=0), pruner=ASHAPruner(**kw))
    s.optimize(objective, n_trials=len(curves))
    return {t.number: (t.state.name, t.last_step) for t in s.trials}


def _run_optuna(curves, direction, kw, storage=None):
    def objective(trial):
        row = curves[trial.number]
        for step, v in enumerate(row, 1):
            trial.report(v, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return row[-1]

    o = optuna.create_study(direction=direction, pruner=tp_optuna.ASHAPruner(**kw), storage=storage)
    o.optimize(objective, n_trials=len(curves))
    names = {optuna.trial.TrialState.COMPLETE: "COMPLETE", optuna.trial.TrialState.PRUNED: "PRUNED"}
    return {t.number: (names[t.state], t.last_step) for t in o.trials}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_trials=st.integers(2, 12), steps=st.integers(1, 12), eta=st.integers(2, 4),
       r0=st.integers(1, 3), rate=st.integers(0, 1), bootstrap=st.integers(0, 4), capped=st.booleans(),
       direction=st.sampled_from(["minimize", "maximize"]))
def test_asha_pruner_prunes_the_same_trials_as_ours(data, n_trials, steps, eta, r0, rate, bootstrap, capped, direction):
    # Values from a small set, so ties at a rung happen and must be broken the same way.
    level = st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0])
    curves = data.draw(st.lists(st.lists(level, min_size=steps, max_size=steps), min_size=n_trials,
                                max_size=n_trials))
    kw = dict(min_resource=r0, reduction_factor=eta, min_early_stopping_rate=rate, bootstrap_count=bootstrap,
              max_resource=max(r0, steps) if capped else None)
    assert _run_optuna(curves, direction, kw) == _run_ours(curves, direction, kw)


def _curve(number: int, step: int) -> float:
    level = [5, 2, 8, 1, 9, 3, 7, 0, 6, 4][number % 10]
    return level + 1.0 / step


def test_asha_pruner_on_sqlite_storage_follows_the_schedule(tmp_path):
    curves = [[_curve(n, s) for s in range(1, 28)] for n in range(10)]
    kw = dict(min_resource=1, reduction_factor=3)
    got = _run_optuna(curves, "minimize", kw, storage=f"sqlite:///{tmp_path / 'asha.db'}")
    assert got == _run_ours(curves, "minimize", kw)
    assert got[7] == ("COMPLETE", 27)  # the lowest plateau always survives
    assert sum(s == "PRUNED" for s, _ in got.values()) >= 5
    o = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'asha.db'}")
    for t in o.trials:  # the rung record each trial left: its value at each rung it reached
        rungs = t.system_attrs["asha_rungs"]
        assert rungs == {str(k): _curve(t.number, 3 ** k) for k in range(len(rungs))}


def test_asha_pruner_non_finite_report_prunes_and_pause_is_not_offered():
    def objective(trial):
        trial.report(float("nan"), 1)
        if trial.should_prune():
            raise optuna.TrialPruned()
        return 0.0

    o = optuna.create_study(pruner=tp_optuna.ASHAPruner())
    o.optimize(objective, n_trials=1)
    assert o.trials[0].state is optuna.trial.TrialState.PRUNED
    with pytest.raises(TypeError):
        tp_optuna.ASHAPruner(pause=True)
    with pytest.raises(ValueError, match="reduction_factor"):
        tp_optuna.ASHAPruner(reduction_factor=1)


@pytest.mark.parametrize("storage", STORAGES)
def test_both_adapters_together_run_the_study_ours_runs(storage, tmp_path):
    # Learning curves whose plateau is Branin at the trial's point: the pruner stops trials, the GP
    # learns from the pruned ones' last values; the Optuna study must make every decision ours makes.
    def ours(trial):
        x, y = trial.suggest_float("x", -5.0, 10.0), trial.suggest_float("y", 0.0, 15.0)
        for step in range(1, 10):
            trial.report(value=branin_xy(x, y) + 10.0 / step, step=step)
            if trial.should_prune():
                raise TrialPruned()
        return branin_xy(x, y) + 10.0 / 9

    def theirs(trial):
        x, y = trial.suggest_float("x", -5.0, 10.0), trial.suggest_float("y", 0.0, 15.0)
        for step in range(1, 10):
            trial.report(branin_xy(x, y) + 10.0 / step, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return branin_xy(x, y) + 10.0 / 9

    s = create_study(sampler=GPSampler(seed=1, n_startup_trials=5), pruner=ASHAPruner.for_budget(20, 9))
    s.optimize(ours, n_trials=20)
    o = optuna.create_study(sampler=tp_optuna.GPSampler(seed=1, n_startup_trials=5),
                            pruner=tp_optuna.ASHAPruner.for_budget(20, 9), storage=_storage(storage, tmp_path, "both"))
    o.optimize(theirs, n_trials=20)
    assert sum(t.state is TrialState.PRUNED for t in s.trials) >= 5
    assert [(t.params, t.state.name, t.value) for t in s.trials] == \
        [(t.params, "COMPLETE" if t.state is optuna.trial.TrialState.COMPLETE else t.state.name, t.value)
         for t in o.trials]


def test_missing_optuna_is_a_clear_import_error():
    code = ("import sys; sys.modules['optuna'] = None\n"
            "try:\n    import trainpatterns.tuning.optuna\n"
            "except ImportError as e:\n    print('ERR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(Path(trainpatterns.__file__).resolve().parent.parent),
                              "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert "ERR trainpatterns.tuning.optuna needs Optuna: pip install optuna" in res.stdout
