"""trainpatterns.tuning beside Optuna, with real Optuna objects as the reference: our SQLite schema
never touches an Optuna database, studies move both ways through Optuna's SQLite RDB storage with
every trial field kept, ``trials_dataframe`` has Optuna's layout, ``enqueue_trial`` and
``best_params`` behave as Optuna's, and a database of the older (unprefixed) schema migrates.
"""
from __future__ import annotations

import datetime
import hashlib
import math
import sqlite3
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainpatterns.tuning import (CategoricalDistribution, FloatDistribution, FrozenTrial, IntDistribution,
                                  RandomSampler, TrialState, create_study, import_from_optuna, load_study)
from trainpatterns.tuning.interop import from_optuna_trial, to_optuna_trial

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

FIELDS = ("number", "state", "value", "params", "distributions", "intermediate_values", "user_attrs", "system_attrs",
          "attempts")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def objective(trial):
    """Every kind of parameter and outcome: trial 2 is pruned after two reports (Optuna's TrialPruned,
    which our studies take as well as ours), trial 3 raises KeyError (caught by the callers), the
    others complete; all set a user attr."""
    a = trial.suggest_float("a", 1e-4, 1.0, log=True)
    b = trial.suggest_int("b", -3, 7, step=2)
    c = trial.suggest_categorical("c", ["p", None, 3, True, 0.5])
    d = trial.suggest_float("d", 0.0, 1.0, step=0.25)
    trial.set_user_attr("memo", {"k": [trial.number, "x"]})
    trial.report(a + 1.0, 1)
    trial.report(a + b, 3)
    if trial.number == 2:
        raise optuna.TrialPruned()
    if trial.number == 3:
        raise KeyError("no such key")
    return a + b + d + (c == "p")


# ----- the schema: our tables only, and a foreign file is never written ---------------------------------

def _optuna_db(path):
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name="theirs")
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=3)
    return study


def test_an_optuna_database_is_refused_and_left_byte_identical(tmp_path):
    db = tmp_path / "optuna.db"
    ref = [t.params for t in _optuna_db(db).trials]
    optuna_tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"studies", "trials", "trial_params", "alembic_version"} <= optuna_tables
    before, listing = _sha(db), sorted(p.name for p in tmp_path.iterdir())
    calls = [lambda: create_study(storage=db, study_name="theirs", load_if_exists=True, sampler=RandomSampler()),
             lambda: create_study(storage=f"sqlite:///{db}", study_name="new", sampler=RandomSampler()),
             lambda: load_study(study_name="theirs", storage=db)]
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert str(db) in msg and "not trainpatterns'" in msg and "nothing in it was changed" in msg
        for table in ("alembic_version", "studies", "trial_params", "trials", "version_info"):
            assert table in msg
        assert "Optuna database" in msg and "import_from_optuna" in msg
        assert _sha(db) == before and sorted(p.name for p in tmp_path.iterdir()) == listing
    # Still a working Optuna database, with its trials as they were.
    assert [t.params for t in optuna.load_study(study_name="theirs", storage=f"sqlite:///{db}").trials] == ref
    assert not ({"tp_studies", "tp_trials"} & optuna_tables)


def test_any_foreign_table_is_refused_even_beside_ours(tmp_path):
    other = tmp_path / "app.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()
    before = _sha(other)
    with pytest.raises(ValueError, match=r"app\.db.*\(notes\)"):
        create_study(storage=other, sampler=RandomSampler())
    assert _sha(other) == before
    mixed = tmp_path / "mixed.db"
    create_study(storage=mixed, study_name="s", sampler=RandomSampler()).optimize(lambda t: 1.0, n_trials=1)
    conn = sqlite3.connect(mixed)
    conn.execute("CREATE VIEW v AS SELECT 1")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match=r"\(v\)"):
        load_study(study_name="s", storage=mixed)


def test_a_database_of_the_unprefixed_schema_migrates_in_place(tmp_path):
    db = tmp_path / "old.db"
    s = create_study(storage=db, study_name="s", sampler=RandomSampler(seed=1))
    s.optimize(objective, n_trials=5, catch=KeyError)
    expected = s.trials
    del s
    # Rewrite the file into the layout of earlier releases: tables `studies` / `trials`, index `trials_state`.
    conn = sqlite3.connect(db)
    conn.executescript("DROP INDEX tp_trials_state; ALTER TABLE tp_studies RENAME TO studies; "
                       "ALTER TABLE tp_trials RENAME TO trials; CREATE INDEX trials_state ON trials(study_id, state);")
    conn.close()
    s = load_study(study_name="s", storage=db, sampler=RandomSampler(seed=1))
    assert s.trials == expected
    names = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}
    assert names == {"tp_studies", "tp_trials", "tp_trials_state"}
    s.optimize(objective, n_trials=2, catch=KeyError)  # and it goes on
    assert [t.number for t in s.trials] == list(range(7))


# ----- moving studies: ours -> Optuna (SQLite RDB) -> ours ---------------------------------------------------

def _assert_same_trial(ours: FrozenTrial, theirs: FrozenTrial) -> None:
    for f in FIELDS:
        assert getattr(theirs, f) == getattr(ours, f), (ours.number, f)
    for f in ("datetime_start", "datetime_complete"):
        a, b = getattr(ours, f), getattr(theirs, f)
        assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-6), (ours.number, f, a, b)


def _check_optuna_trial(ours: FrozenTrial, ft) -> None:
    """One of our trials against the Optuna trial it became, field by field."""
    assert ft.number == ours.number
    assert ft.state.name == ("FAIL" if ours.state is TrialState.FAILED else ours.state.name)
    assert ft.value == ours.value and ft.params == ours.params
    assert ft.intermediate_values == ours.intermediate_values and ft.user_attrs == ours.user_attrs
    assert ft.system_attrs == {**ours.system_attrs, "trainpatterns:attempts": ours.attempts}
    for name, d in ours.distributions.items():
        od = ft.distributions[name]
        if isinstance(d, CategoricalDistribution):
            assert list(od.choices) == list(d.choices)
        else:
            assert (od.low, od.high, od.log, od.step) == (d.low, d.high, d.log, d.step)
    completed = ours.datetime_complete if ours.state.is_finished() else None
    for theirs_time, ours_time in ((ft.datetime_start, ours.datetime_start), (ft.datetime_complete, completed)):
        assert (theirs_time is None) == (ours_time is None)
        assert ours_time is None or abs(theirs_time.timestamp() - ours_time) <= 1e-6


def test_round_trip_through_optuna_sqlite_keeps_every_trial_field(tmp_path):
    ours = create_study(direction="maximize", sampler=RandomSampler(seed=4), storage=tmp_path / "ours.db",
                        study_name="mlp")
    ours.enqueue_trial({"a": 0.5, "b": 1, "c": None, "d": 0.75}, user_attrs={"from": "enqueue"})
    ours.optimize(objective, n_trials=7, catch=(KeyError,))
    running = ours.ask()  # left RUNNING
    running.suggest_float("a", 1e-4, 1.0, log=True)
    running.report(0.125, 2)
    ours.enqueue_trial({"a": 0.25})

    def interrupted(trial):
        trial.suggest_float("a", 1e-4, 1.0, log=True)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # takes the queued trial, which goes back to WAITING
        ours.optimize(interrupted, n_trials=1)
    trials = ours.trials
    assert trials[-1].datetime_start is not None and trials[-1].datetime_complete is None
    assert [t.state for t in trials[:4]] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED,
                                             TrialState.FAILED]
    assert [t.state for t in trials[-2:]] == [TrialState.RUNNING, TrialState.WAITING]

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    exported = ours.export_to_optuna(url)
    theirs = optuna.load_study(study_name="mlp", storage=url)  # a fresh read of Optuna's tables
    assert exported.study_name == "mlp" and theirs.direction == optuna.study.StudyDirection.MAXIMIZE
    assert len(theirs.trials) == len(trials)
    for t, ft in zip(trials, theirs.trials):
        _check_optuna_trial(t, ft)
    assert theirs.best_params == ours.best_params and theirs.best_value == ours.best_value
    assert theirs.best_trial.number == ours.best_trial.number

    back = import_from_optuna(url, "mlp", to_storage=tmp_path / "back.db", to_study_name="again",
                              sampler=RandomSampler(seed=4))
    assert back.direction == "maximize" and back.study_name == "again"
    again = load_study(study_name="again", storage=tmp_path / "back.db").trials
    assert len(again) == len(trials)
    for t, u in zip(trials, again):
        _assert_same_trial(t, u)
    # The imported study goes on: the RUNNING trial (no owner here) is retried first with its
    # parameters, then the WAITING one takes its enqueued value.
    back.optimize(objective, n_trials=1, catch=KeyError)
    t7, t8 = back.trials[7], back.trials[8]
    assert t7.state is TrialState.COMPLETE and t7.params["a"] == running.params["a"] and t7.attempts == 2
    assert t8.state is TrialState.COMPLETE and t8.params["a"] == 0.25
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        ours.export_to_optuna(url)


def test_importing_an_optuna_study_gives_its_best_params_and_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    theirs = optuna.create_study(direction="minimize", storage=url, study_name="o",
                                 sampler=optuna.samplers.TPESampler(seed=0),
                                 pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))

    def their_objective(trial):
        x = trial.suggest_float("x", -5.0, 5.0)
        n = trial.suggest_int("n", 1, 64, log=True)
        opt = trial.suggest_categorical("opt", ["sgd", "adam"])
        trial.set_user_attr("n_half", n // 2)
        for step in range(4):
            trial.report((x - 1) ** 2 + 4 - step + (opt == "sgd"), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        if trial.number == 1:  # MedianPruner never prunes its first 2 trials
            raise RuntimeError("flaky")
        return (x - 1) ** 2 + 1 / n + (opt == "sgd")

    theirs.optimize(their_objective, n_trials=14, catch=(RuntimeError,))
    theirs.enqueue_trial({"x": 0.5, "n": 8, "opt": "adam"})
    ref = optuna.load_study(study_name="o", storage=url)
    states = {t.state.name for t in ref.trials}
    assert states == {"COMPLETE", "PRUNED", "FAIL", "WAITING"}

    ours = import_from_optuna(url, "o")
    assert ours.direction == "minimize"
    assert ours.best_params == ref.best_params and ours.best_value == ref.best_value
    assert len(ours.trials) == len(ref.trials)
    for t, ft in zip(ours.trials, ref.trials):
        assert t.number == ft.number
        assert t.state.name == ("FAILED" if ft.state.name == "FAIL" else ft.state.name)
        assert t.params == ft.params and t.value == ft.value and t.user_attrs == ft.user_attrs
        assert t.intermediate_values == ft.intermediate_values and t.system_attrs == ft.system_attrs
        for ours_time, their_time in ((t.datetime_start, ft.datetime_start),
                                      (t.datetime_complete, ft.datetime_complete)):
            assert ours_time == (None if their_time is None else their_time.timestamp())
        for name, d in t.distributions.items():
            od = ft.distributions[name]
            assert d == (CategoricalDistribution(tuple(od.choices)) if name == "opt"
                         else type(d)(od.low, od.high, od.log, od.step))
    waiting = ours.trials[-1]
    assert waiting.state is TrialState.WAITING and waiting.attempts == 0
    # The enqueued Optuna trial runs first in our study, with Optuna's fixed params.
    ours.optimize(lambda t: t.suggest_float("x", -5.0, 5.0) + t.suggest_int("n", 1, 64, log=True), n_trials=1)
    assert ours.trials[waiting.number].params == {"x": 0.5, "n": 8}

    multi = optuna.create_study(directions=["minimize", "maximize"], storage=url, study_name="two")
    multi.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=1)
    with pytest.raises(ValueError, match="2 objectives"):
        import_from_optuna(url, "two")
    with pytest.raises(KeyError):
        import_from_optuna(url, "missing")


_float_dists = st.one_of(
    st.builds(lambda lo, w: FloatDistribution.make("p", lo, lo + w), st.floats(-1e3, 1e3), st.floats(0, 1e3)),
    st.builds(lambda lo, w: FloatDistribution.make("p", lo, lo * w, log=True), st.floats(1e-6, 10), st.floats(1, 1e4)),
    st.builds(lambda lo, k, s: FloatDistribution.make("p", lo, lo + k * s, step=s),
              st.integers(-50, 50).map(lambda i: i / 4), st.integers(0, 30),
              st.sampled_from([0.1, 0.25, 0.3, 0.5, 2.0])))
_int_dists = st.builds(lambda lo, w, s: IntDistribution.make("p", lo, lo + w, step=s), st.integers(-100, 100),
                       st.integers(0, 200), st.integers(1, 7))
_cat_dists = st.lists(st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(["a", "b", "c"])),
                      min_size=1, max_size=5, unique_by=lambda c: (type(c).__name__, c)).map(
                          lambda cs: CategoricalDistribution.make("p", cs))


@settings(max_examples=60, deadline=None)
@given(dists=st.lists(st.one_of(_float_dists, _int_dists, _cat_dists), min_size=1, max_size=4),
       units=st.lists(st.floats(0, 1), min_size=4, max_size=4),
       state=st.sampled_from(list(TrialState)),
       steps=st.dictionaries(st.integers(0, 10 ** 6), st.floats(-1e9, 1e9), max_size=4))
def test_trial_conversion_round_trips_through_optuna(dists, units, state, steps):
    # Any trial we can store: converted to Optuna's FrozenTrial, validated by Optuna's add_trial
    # (in-memory storage) and converted back, it is the same trial; stepped floats may move to
    # Optuna's decimal top of range (by less than 1e-15 relative, see interop's docstring).
    distributions = {f"p{i}": d for i, d in enumerate(dists)}
    params = {}
    for (name, d), u in zip(distributions.items(), units):
        if isinstance(d, CategoricalDistribution):
            params[name] = d.choices[int(u * (len(d.choices) - 1))]
        else:
            params[name] = d.from_unit(u)
    finished = state.is_finished()
    value = 0.5 if state in (TrialState.COMPLETE, TrialState.PRUNED) else None
    t = FrozenTrial(number=0, state=state, value=value, params=params, distributions=distributions,
                    intermediate_values=steps, user_attrs={"u": [1]}, system_attrs={"s": "x"},
                    attempts=0 if state is TrialState.WAITING else 2, datetime_start=1.7e9 + 0.25,
                    datetime_complete=1.7e9 + 3.5 if finished else None)
    study = optuna.create_study()
    study.add_trial(to_optuna_trial(t))
    back = from_optuna_trial(study.trials[0])
    for f in FIELDS:
        if f != "params":
            assert getattr(back, f) == getattr(t, f), f
    assert back.datetime_start == t.datetime_start and back.datetime_complete == t.datetime_complete
    assert back.params.keys() == t.params.keys()
    for name, v in t.params.items():
        d = distributions[name]
        if isinstance(d, FloatDistribution) and d.step is not None:
            assert back.params[name] == pytest.approx(v, rel=1e-15, abs=1e-15) and d.contains(back.params[name])
        else:
            assert back.params[name] == v and type(back.params[name]) is type(v)


# ----- trials_dataframe, best_params, enqueue_trial against Optuna's -------------------------------------------

def _same_run_in_optuna(ours):
    """The trials of ``ours`` replayed in an Optuna study: each enqueued with our params and user
    attrs, then the same objective (the outcomes depend only on the params and the number)."""
    theirs = optuna.create_study(direction=ours.direction)
    for t in ours.trials:
        theirs.enqueue_trial(t.params)
    theirs.optimize(objective, n_trials=len(ours.trials), catch=(KeyError,))
    return theirs


def test_trials_dataframe_has_optunas_columns_and_values():
    pd = pytest.importorskip("pandas")
    ours = create_study(sampler=RandomSampler(seed=2))
    assert ours.trials_dataframe().empty
    ours.optimize(objective, n_trials=6, catch=KeyError)
    theirs = _same_run_in_optuna(ours)
    attrs = ("number", "value", "datetime_start", "datetime_complete", "duration", "params", "user_attrs",
             "intermediate_values", "state")
    a, b = ours.trials_dataframe(attrs), theirs.trials_dataframe(attrs)
    assert list(a.columns) == list(b.columns)
    assert "params_a" in a.columns and "user_attrs_memo" in a.columns and "intermediate_values_3" in a.columns
    for col in a.columns:
        if col.startswith("datetime") or col == "duration":
            assert a[col].dtype == b[col].dtype, col
        elif col == "state":
            assert list(a[col]) == [s.replace("FAIL", "FAILED") for s in b[col]]
        else:
            pd.testing.assert_series_equal(a[col], b[col], check_names=True)
    for t, row in zip(ours.trials, a.itertuples()):
        assert row.datetime_start == pd.Timestamp(datetime.datetime.fromtimestamp(t.datetime_start))
        assert row.duration == row.datetime_complete - row.datetime_start
    multi = ours.trials_dataframe(("number", "params"), multi_index=True)
    assert list(multi.columns) == [("number", ""), ("params", "a"), ("params", "b"), ("params", "c"), ("params", "d")]
    default = ours.trials_dataframe()
    assert list(default.columns[:5]) == ["number", "value", "datetime_start", "datetime_complete", "duration"]
    assert default.columns[-1] == "state" and "system_attrs_fail_reason" in default.columns
    with pytest.raises(ValueError, match="unknown attrs"):
        ours.trials_dataframe(("number", "colour"))


def test_trials_dataframe_without_pandas_says_so(monkeypatch):
    ours = create_study(sampler=RandomSampler(seed=2))
    ours.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"trials_dataframe\(\) needs pandas: pip install pandas"):
        ours.trials_dataframe()


def test_enqueue_trial_as_optuna():
    def obj(trial):
        x = trial.suggest_float("x", 0.0, 10.0)
        n = trial.suggest_int("n", 0, 8, step=2)
        c = trial.suggest_categorical("c", ["u", "v"])
        return x + n + (c == "v")

    queued = [({"x": 5, "n": 4.0, "c": "v"}, None), ({"x": np.float64(2.5), "n": np.int64(6)}, {"memo": "fixed"}),
              ({"x": 1.0, "unused": "ignored"}, None)]
    ours, theirs = create_study(sampler=RandomSampler(seed=0)), optuna.create_study()
    for params, attrs in queued:
        assert ours.enqueue_trial(params, user_attrs=attrs) == len(ours.trials) - 1
        theirs.enqueue_trial(params, user_attrs=attrs)
    for study in (ours, theirs):
        study.optimize(obj, n_trials=4)
    for (params, _), t, ft in zip(queued, ours.trials, theirs.trials):
        taken = [k for k in params if k in ("x", "n", "c")]
        assert {k: t.params[k] for k in taken} == {k: ft.params[k] for k in taken} == {k: params[k] for k in taken}
        assert all(type(t.params[k]) is type(ft.params[k]) for k in taken)
        assert t.user_attrs == ft.user_attrs and "unused" not in t.params
    assert type(ours.trials[0].params["n"]) is int and type(ours.trials[0].params["x"]) is float
    assert ours.best_params == min(ours.trials, key=lambda t: t.value).params

    # skip_if_exists: the same point is not queued twice (ours returns the existing trial's number).
    before = len(ours.trials)
    assert ours.enqueue_trial({"x": 5.0, "n": 4, "c": "v"}, skip_if_exists=True) == 0
    assert len(ours.trials) == before
    assert ours.enqueue_trial({"x": 5.5, "n": 4, "c": "v"}, skip_if_exists=True) == before

    # Outside the range given at suggest time: that trial fails naming the parameter, and (catch=())
    # the study stops; Optuna only warns here and runs the value anyway.
    s = create_study(sampler=RandomSampler(seed=0))
    s.enqueue_trial({"x": 11.0})
    with pytest.raises(ValueError, match=r"parameter 'x'.*11\.0.*outside"):
        s.optimize(obj, n_trials=2)
    assert s.trials[0].state is TrialState.FAILED and "'x'" in s.trials[0].fail_reason
    for bad, error, msg in (([("x", 1)], TypeError, "params must be a dict"),
                            ({"x": [1]}, TypeError, "parameter 'x' is a list"),
                            ({"x": math.nan}, ValueError, "parameter 'x' must be finite"),
                            ({3: 1.0}, TypeError, "non-empty strings")):
        with pytest.raises(error, match=msg):
            s.enqueue_trial(bad)
    assert len(s.trials) == 1  # a refused call queues nothing
