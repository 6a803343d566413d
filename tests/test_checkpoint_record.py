"""trainpatterns.checkpoint: the directory's record (metric, mode, weights entry) and the retention
pin on the checkpoint a run resumed from.

References: the weights each save was given (cloned before saving, compared element by element),
the best step computed here by plain min/max over the metrics this test chose, the record read back
with ``json``, and the set of steps retention must keep computed here by plain arithmetic.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trainpatterns as tp
from trainpatterns.checkpoint import CheckpointError, CheckpointManager

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(tp.__file__)))
RECORD_FORMAT = "trainpatterns.checkpoint.directory"


def net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))


def weights(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_weights(module: torch.nn.Module, expected: dict) -> None:
    got = module.state_dict()
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def run_like_a_trainer(directory, metrics: list, mode: str = "min") -> list:
    """Saves as the Trainer does: a model, a teacher (so the model entry must be named), an optimizer;
    the weights of each step, as saved."""
    model, teacher = net(0), net(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = CheckpointManager(directory, keep_last=None, keep_best=1, metric="val_loss", mode=mode,
                            weights_key="model")
    saved = []
    for step, m in enumerate(metrics):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step + 1)
        mgr.save({"model": model, "teacher": teacher, "opt": opt}, step, {"val_loss": m, "other": -m})
        saved.append(weights(model))
    mgr.wait()
    return saved


# --------------------------------------------------------------------------------------------------
# the record

@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_bare_manager_loads_best_weights_and_restores_best_from_the_record(tmp_path, mode):
    metrics = [3.0, 1.0, 4.0, 0.5, 2.0]
    saved = run_like_a_trainer(tmp_path, metrics, mode)
    best = metrics.index(min(metrics) if mode == "min" else max(metrics))
    assert json.load(open(tmp_path / "manager.json")) == {
        "format": RECORD_FORMAT, "version": 1, "metric": "val_loss", "mode": mode, "weights_key": "model"}

    mgr = CheckpointManager(tmp_path)
    assert (mgr.metric, mgr.mode, mgr.weights_key) == ("val_loss", mode, "model")
    fresh = net(9)
    mgr.load_weights(fresh, "best")
    assert_weights(fresh, saved[best])
    mgr.load_weights(fresh)  # "latest"
    assert_weights(fresh, saved[-1])
    model, teacher = net(7), net(8)
    state = {"model": model, "teacher": teacher, "opt": torch.optim.SGD(model.parameters(), lr=0.1)}
    assert mgr.restore(state, "best") == best
    assert_weights(model, saved[best])
    assert_weights(teacher, weights(net(1)))


def test_given_arguments_win_and_the_saving_manager_rewrites_the_record(tmp_path):
    metrics = [3.0, 1.0, 4.0, 0.5, 2.0]
    saved = run_like_a_trainer(tmp_path, metrics, "min")
    same_metric = CheckpointManager(tmp_path, metric="val_loss")
    assert (same_metric.metric, same_metric.mode, same_metric.weights_key) == ("val_loss", "min", "model")
    # another metric: its mode is not the recorded one's; ranking and keep_best follow it
    other = CheckpointManager(tmp_path, keep_last=1, keep_best=2, metric="other", mode="max")
    assert (other.metric, other.mode, other.weights_key) == ("other", "max", "model")
    fresh = net(9)
    other.load_weights(fresh, "best")
    assert_weights(fresh, saved[metrics.index(min(metrics))])  # other = -val_loss, by max
    model = net(3)
    other.save({"model": model, "teacher": net(1), "opt": torch.optim.SGD(model.parameters(), lr=0.1)}, 5,
               {"val_loss": 9.0, "other": -9.0})
    other.wait()
    history = [(s, -m) for s, m in enumerate(metrics)] + [(5, -9.0)]
    best_two = {s for _, s in sorted(((-o, s) for s, o in history))[:2]}
    assert {i.step for i in other.list()} == best_two | {5}
    assert json.load(open(tmp_path / "manager.json")) == {
        "format": RECORD_FORMAT, "version": 1, "metric": "other", "mode": "max", "weights_key": "model"}
    assert CheckpointManager(tmp_path, metric="val_loss").mode == "min"  # the record's mode is other's


def test_a_directory_without_record_keeps_working_and_keeps_the_clear_error(tmp_path):
    mgr = CheckpointManager(tmp_path, async_save=False)  # nothing to record
    model = net(0)
    mgr.save({"model": model, "teacher": net(1)}, 1, {"val_loss": 1.0})
    assert not (tmp_path / "manager.json").exists()
    bare = CheckpointManager(tmp_path)
    assert (bare.metric, bare.mode, bare.weights_key) == (None, "min", None)
    with pytest.raises(ValueError, match="needs a metric.*records none"):
        bare.load_weights(net(2), "best", key="model")
    with pytest.raises(ValueError, match="needs a metric"):
        bare.restore({"model": net(2)}, "best")
    with pytest.raises(ValueError, match="pass key="):
        bare.load_weights(net(2))
    fresh = net(2)
    bare.load_weights(fresh, key="model")
    assert_weights(fresh, weights(model))
    with pytest.raises(ValueError, match="keep_best > 0 needs metric="):
        CheckpointManager(tmp_path, keep_best=1)


def test_a_manager_created_before_the_record_reads_it_when_it_needs_it(tmp_path):
    early = CheckpointManager(tmp_path)
    saved = run_like_a_trainer(tmp_path, [2.0, 1.0, 3.0])
    fresh = net(9)
    early.load_weights(fresh, "best")
    assert_weights(fresh, saved[1])
    assert CheckpointManager(tmp_path, keep_best=1).metric == "val_loss"  # keep_best from the record


def test_a_leftover_temporary_record_is_removed(tmp_path):
    run_like_a_trainer(tmp_path, [1.0])
    leftover = tmp_path / ".tmp-manager.json.4242"
    leftover.write_text("{")
    assert CheckpointManager(tmp_path).weights_key == "model"
    assert not leftover.exists()
    assert sorted(os.listdir(tmp_path)) == ["manager.json", "step_00000000"]


def _valid(doc) -> bool:
    """The reader's rules, restated: the documented fields of the documented types."""
    if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
        return False
    v = doc.get("version")
    if type(v) is not int or v != 1:
        return False
    names = [doc.get("metric"), doc.get("weights_key")]
    if any(n is not None and not (isinstance(n, str) and 0 < len(n) <= 1000) for n in names):
        return False
    return doc.get("mode") in (("min", "max") if doc.get("metric") is not None else (None,))


_json = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=4),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                     max_leaves=6)
_field = st.sampled_from([None, "", "val_loss", "model", "min", "max", 1, True, 1.5, [], {}, "x" * 1001])
_record = st.fixed_dictionaries(
    {}, optional={"format": st.sampled_from([RECORD_FORMAT, "other", 1, None]),
                  "version": st.sampled_from([1, 2, 0, True, 1.0, "1", None]),
                  "metric": _field, "mode": _field, "weights_key": _field, "extra": _json})


_good_record = st.fixed_dictionaries({
    "format": st.just(RECORD_FORMAT), "version": st.just(1),
    "metric": st.sampled_from(["val_loss", "acc"]), "mode": st.sampled_from(["min", "max"]),
    "weights_key": st.sampled_from([None, "model"])}) | st.fixed_dictionaries({
        "format": st.just(RECORD_FORMAT), "version": st.just(1), "metric": st.none(), "mode": st.none(),
        "weights_key": st.text(min_size=1, max_size=5)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(_good_record, _record, _json), raw=st.none() | st.binary(max_size=40))
def test_any_record_is_read_exactly_or_refused_with_checkpoint_error(tmp_path, doc, raw):
    directory = tempfile.mkdtemp(dir=tmp_path)
    path = os.path.join(directory, "manager.json")
    with open(path, "wb") as f:
        f.write(raw if raw is not None else json.dumps(doc).encode())
    if raw is not None:
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None  # not JSON: must be refused
    if doc is not None and _valid(doc):
        mgr = CheckpointManager(directory)
        assert (mgr.metric, mgr.weights_key) == (doc.get("metric"), doc.get("weights_key"))
        assert mgr.mode == (doc.get("mode") or "min")
    else:
        with pytest.raises(CheckpointError, match="manager.json"):
            CheckpointManager(directory)
    # a manager given everything never reads it, and its first save replaces it
    mgr = CheckpointManager(directory, metric="m", mode="max", weights_key="w", async_save=False)
    mgr.save({"w": net(0)}, 0)
    assert json.load(open(path)) == {"format": RECORD_FORMAT, "version": 1, "metric": "m", "mode": "max",
                                     "weights_key": "w"}


@pytest.mark.parametrize("kind", ["directory", "fifo", "dangling-link"])
def test_a_record_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    path = tmp_path / "manager.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(tmp_path / "nowhere", path)
    with pytest.raises(CheckpointError, match="manager.json"):
        CheckpointManager(tmp_path)


# --------------------------------------------------------------------------------------------------
# retention never deletes the checkpoint a run resumed from

KEEP_LAST, KEEP_BEST = 3, 1
FIRST_RUN = [5.0, 0.5, 4.0, 3.0, 6.0, 7.0, 2.5, 3.5, 8.0, 9.0]  # steps 0..9; the best is step 1
RESUME_FROM = 7  # neither the latest (9) nor the best (1)
RESUMED_STEPS = range(10, 40)


def resumed_metrics() -> list:
    rng = random.Random(5)  # some beat step 1's 0.5, so the best moves on
    return [rng.uniform(0.0, 10.0) for _ in RESUMED_STEPS]


def expected_kept(history: list, pinned: int) -> set:
    """Newest KEEP_LAST by step, best KEEP_BEST by the lowest metric (the later step on a tie), and ``pinned``."""
    history = sorted(history)
    best = sorted((m, -s) for s, m in history)[:KEEP_BEST]
    return {s for s, _ in history[-KEEP_LAST:]} | {-s for _, s in best} | {pinned}


def new_manager(directory) -> CheckpointManager:
    return CheckpointManager(directory, keep_last=KEEP_LAST, keep_best=KEEP_BEST, metric="val")


def first_run(directory) -> tuple:
    """The run that wrote the checkpoints: its manager and the tensor each step saved."""
    mgr = new_manager(directory)
    saved = {}
    for step, m in enumerate(FIRST_RUN):
        w = torch.full((4,), float(step))
        mgr.save({"w": w, "n": step}, step, {"val": m})
        saved[step] = w.clone()
    mgr.wait()
    assert {i.step for i in mgr.list()} == {1, 7, 8, 9} == expected_kept(list(enumerate(FIRST_RUN)), 8)
    return mgr, saved


RESUME_SCRIPT = """
import json, sys, torch
from trainpatterns.checkpoint import CheckpointManager
directory, which, steps, metrics = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
mgr = CheckpointManager(directory, keep_last=3, keep_best=1, metric="val")
state = {"w": torch.zeros(4), "n": None}
print(json.dumps({"restored": mgr.restore(state, which), "w": state["w"].tolist(), "n": state["n"]}))
for step, m in zip(steps, metrics):
    mgr.save({"w": torch.full((4,), float(step)), "n": step}, step, {"val": m})
    mgr.wait()
    print(json.dumps(sorted(i.step for i in mgr.list())))
"""


def resume_in_this_process(mgr: CheckpointManager, saved: dict, metrics: list) -> list:
    state = {"w": torch.zeros(4), "n": None}
    assert mgr.restore(state, RESUME_FROM) == RESUME_FROM
    assert torch.equal(state["w"], saved[RESUME_FROM]) and state["n"] == RESUME_FROM
    listed = []
    for step, m in zip(RESUMED_STEPS, metrics):
        mgr.save({"w": torch.full((4,), float(step)), "n": step}, step, {"val": m})
        mgr.wait()
        listed.append(sorted(i.step for i in mgr.list()))
    return listed


def resume_in_a_new_process(directory, saved: dict, metrics: list) -> list:
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(directory), str(RESUME_FROM),
                          json.dumps(list(RESUMED_STEPS)), json.dumps(metrics)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0] == {"restored": RESUME_FROM, "w": saved[RESUME_FROM].tolist(), "n": RESUME_FROM}
    return lines[1:]


@pytest.mark.parametrize("who", ["the writer", "a new manager", "a new process"])
def test_the_checkpoint_a_run_resumed_from_survives_its_retention(tmp_path, who):
    writer, saved = first_run(tmp_path)
    metrics = resumed_metrics()
    if who == "a new process":
        listed = resume_in_a_new_process(tmp_path, saved, metrics)
    else:
        listed = resume_in_this_process(writer if who == "the writer" else new_manager(tmp_path), saved, metrics)
    history = list(enumerate(FIRST_RUN))
    assert len(listed) == len(RESUMED_STEPS)
    for step, m, kept in zip(RESUMED_STEPS, metrics, listed):
        history.append((step, m))
        assert RESUME_FROM in kept and len(kept) <= KEEP_LAST + KEEP_BEST + 1
        assert set(kept) == expected_kept(history, RESUME_FROM), step
    assert min(metrics) < min(FIRST_RUN)  # the best moved on during the resumed run
    state = {"w": torch.zeros(4), "n": None}
    assert CheckpointManager(tmp_path).restore(state, RESUME_FROM) == RESUME_FROM
    assert torch.equal(state["w"], saved[RESUME_FROM])


@pytest.mark.parametrize("through", ["manager", "restore"])
def test_a_restore_through_a_symlink_still_pins_its_checkpoint(tmp_path, through):
    real, link = tmp_path / "real", tmp_path / "link"
    _, saved = first_run(real)
    os.symlink(real, link)
    mgr_dir, restore_dir = (link, real) if through == "manager" else (real, link)
    mgr = CheckpointManager(mgr_dir, keep_last=KEEP_LAST, keep_best=KEEP_BEST, metric="val", async_save=False)
    state = {"w": torch.zeros(4), "n": None}
    assert mgr.restore(state, restore_dir / f"step_{RESUME_FROM:08d}") == RESUME_FROM
    for step, m in zip(RESUMED_STEPS, resumed_metrics()):
        mgr.save({"w": torch.full((4,), float(step)), "n": step}, step, {"val": m})
        assert RESUME_FROM in {i.step for i in mgr.list()}, step
    state = {"w": torch.zeros(4), "n": None}
    assert CheckpointManager(real).restore(state, RESUME_FROM) == RESUME_FROM
    assert torch.equal(state["w"], saved[RESUME_FROM])
