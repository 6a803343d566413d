"""The built-in tuning job shows tuning working: `trainpatterns tune` finishes several trials, the
GP learns from pruned trials' last values, the per-trial lines show the best value falling, and the
plots draw pruned trials and the intermediate-value curves. Each checked against an independent
reference: the stored study, the values the objective reported, a hand count of ASHA's rungs.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trainpatterns
from trainpatterns.tuning import (ASHAPruner, FloatDistribution, GPSampler, RandomSampler, TrialPruned,
                                  TrialState, create_study, load_study)
from trainpatterns.tuning.gp_model import _Encoder, warp_outputs
from trainpatterns.tuning.trial import FrozenTrial

PYTHON_DIR = str(Path(trainpatterns.__file__).resolve().parent.parent)
SPACE = {"x": FloatDistribution(0.0, 1.0), "y": FloatDistribution(0.0, 1.0)}


# ----- the command ---------------------------------------------------------------------------------------

def _png_pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(str(path))[..., :3]


def test_default_tune_command_finishes_trials_and_shows_the_best_falling(tmp_path):
    pytest.importorskip("matplotlib")
    # The command; --storage only keeps the study for the reference below.
    argv = [sys.executable, "-m", "trainpatterns", "tune", "--trials", "12", "--plots", "out", "--storage", "t.db"]
    res = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": PYTHON_DIR, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    trials = load_study(study_name="pendulum", storage=tmp_path / "t.db").trials
    assert len(trials) == 12
    done = [t for t in trials if t.state is TrialState.COMPLETE]
    assert len(done) >= 3, [(t.number, t.state.name, t.last_step) for t in trials]
    # One line per trial, each with the best COMPLETE value so far, as the stored study says.
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("trial ")]
    assert len(lines) == 12
    running, expected = math.inf, []
    for t in trials:
        running = min(running, t.value) if t.state is TrialState.COMPLETE else running
        expected.append(f"best {running:.4e}" if math.isfinite(running) else "best -")
    assert [re.search(r"best (\S+)", ln).group(0) for ln in lines] == expected
    first = next(t.value for t in trials if t.state is TrialState.COMPLETE)
    assert min(t.value for t in done) < first  # the best after the last trial beats the first result
    assert f"-> {min(t.value for t in done):.3e}" in res.stdout  # the summary's "best value by trial"
    # Pruned trials were stopped at the rung for_budget placed (12 trials of 300 steps: one, at 100).
    assert {t.last_step for t in trials if t.state is TrialState.PRUNED} <= {120}
    for name in ("history.png", "intermediate.png"):
        px = _png_pixels(tmp_path / "out" / name)
        inked = (px < 0.95).any(axis=-1)
        assert inked.mean() > 0.03, name
        grey = (np.ptp(px, axis=-1) < 0.02) & (px.mean(-1) > 0.3) & (px.mean(-1) < 0.7)
        assert grey.sum() > 50, name  # the pruned trials' grey marks are drawn


# ----- pruning fit for the budget ---------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(n_trials=st.integers(1, 2000), max_resource=st.integers(1, 5000), eta=st.integers(2, 5),
       min_complete=st.integers(1, 6))
def test_for_budget_places_as_many_rungs_as_leave_min_complete_trials(n_trials, max_resource, eta, min_complete):
    p = ASHAPruner.for_budget(n_trials, max_resource, reduction_factor=eta, min_complete=min_complete)
    want = max(r for r in range(64) if min_complete * eta ** r <= n_trials) if n_trials >= min_complete else 0
    rungs = [p.rung_resource(k) for k in range(64) if p.rung_resource(k) < max_resource]
    if max_resource >= eta ** want:
        assert len(rungs) == want
    else:  # too few steps for that many rungs
        assert len(rungs) <= want
    if rungs:
        assert rungs[-1] * eta >= max_resource  # the top rung judges at least 1/eta of the training
    assert all(b == a * eta for a, b in zip(rungs, rungs[1:]))
    # And the pruner stops nothing at or past the last rung: step max_resource is never a rung.
    assert p._rungs_reached(max_resource) == len(rungs)


def test_for_budget_rejects_bad_arguments():
    for kw, name in ((dict(n_trials=0, max_resource=10), "n_trials"), (dict(n_trials=5, max_resource=0), "max_resource"),
                     (dict(n_trials=5, max_resource=10, reduction_factor=1), "reduction_factor"),
                     (dict(n_trials=5, max_resource=10, min_complete=True), "min_complete")):
        with pytest.raises(ValueError, match=f"for_budget: {name} must be an int"):
            ASHAPruner.for_budget(**kw)


# ----- the GP learns from pruned trials -------------------------------------------------------------

def _frozen(number, state, x, y, values):
    """A stored trial at (x, y) with reports ``values`` at steps 1..n (its value: the last one)."""
    return FrozenTrial(number=number, state=state, value=values[-1], params={"x": x, "y": y}, distributions=dict(SPACE),
                       intermediate_values={i + 1: v for i, v in enumerate(values)})


HISTORY = [
    _frozen(0, TrialState.COMPLETE, 0.2, 0.3, [3.0, 2.0, 1.5]),
    _frozen(1, TrialState.PRUNED, 0.8, 0.1, [4.0, 3.5]),
    _frozen(2, TrialState.PRUNED, 0.5, 0.9, [9.0]),
    _frozen(3, TrialState.COMPLETE, 0.4, 0.6, [2.5, 1.8, 1.2]),
    _frozen(4, TrialState.PRUNED, 0.1, 0.7, [0.5]),  # an early value below every final one
    _frozen(5, TrialState.FAILED, 0.3, 0.3, [1.0]),
]


class _Capture:
    def __init__(self, monkeypatch, sampler):
        self.calls = []
        original = sampler._maximise_acquisition

        def spy(gp, enc, best, x, y, number):
            self.calls.append(dict(x=gp.x.copy(), y=gp.y.copy(), x_best=x[int(np.argmin(y))].copy(), best=best))
            return original(gp, enc, best, x, y, number)

        monkeypatch.setattr(sampler, "_maximise_acquisition", spy)


def test_gp_learns_from_pruned_trials_at_their_last_value(monkeypatch):
    sampler = GPSampler(seed=0, n_startup_trials=4, n_candidates=64, n_local_search=2)
    cap = _Capture(monkeypatch, sampler)
    proposal = sampler.before_trial(None, 6, HISTORY)
    assert set(proposal) == {"x", "y"} and len(cap.calls) == 1  # 2 COMPLETE + 3 PRUNED >= 4: the GP ran
    seen = [t for t in HISTORY if t.state is not TrialState.FAILED]
    enc = _Encoder(SPACE)
    np.testing.assert_array_equal(cap.calls[0]["x"], np.array([enc.encode(t.params) for t in seen]))
    last = np.array([t.intermediate_values[max(t.intermediate_values)] for t in seen])
    np.testing.assert_allclose(cap.calls[0]["y"], warp_outputs(last), rtol=0, atol=1e-12)
    # The incumbent is the best COMPLETE trial (number 3), not pruned trial 4's lower early value.
    i3 = [t.number for t in seen].index(3)
    assert cap.calls[0]["best"] == cap.calls[0]["y"][i3]
    np.testing.assert_array_equal(cap.calls[0]["x_best"], enc.encode(HISTORY[3].params))


def test_gp_ignores_pruned_trials_when_told_and_maximises_by_sign(monkeypatch):
    sampler = GPSampler(seed=0, n_startup_trials=4, n_candidates=64, n_local_search=2, learn_from_pruned=False)
    cap = _Capture(monkeypatch, sampler)
    assert sampler.before_trial(None, 6, HISTORY) == {}  # 2 COMPLETE < 4: still the random startup
    assert cap.calls == []
    sampler = GPSampler(seed=0, n_startup_trials=2, n_candidates=64, n_local_search=2)
    cap = _Capture(monkeypatch, sampler)

    class Maximise:
        direction = "maximize"

    sampler.before_trial(Maximise(), 6, HISTORY)
    seen = [t for t in HISTORY if t.state is not TrialState.FAILED]
    last = np.array([t.value for t in seen])
    np.testing.assert_allclose(cap.calls[0]["y"], warp_outputs(-last), rtol=0, atol=1e-12)
    i0 = [t.number for t in seen].index(0)  # the best COMPLETE value when maximising: 1.5 (trial 0)
    assert cap.calls[0]["best"] == cap.calls[0]["y"][i0]


def test_pruned_trial_with_another_space_is_left_out(monkeypatch):
    other = FrozenTrial(number=6, state=TrialState.PRUNED, value=0.1, params={"x": 0.5, "y": 3.0},
                        distributions={"x": SPACE["x"], "y": FloatDistribution(0.0, 5.0)}, intermediate_values={1: 0.1})
    sampler = GPSampler(seed=0, n_startup_trials=2, n_candidates=64, n_local_search=2)
    cap = _Capture(monkeypatch, sampler)
    sampler.before_trial(None, 7, HISTORY + [other])
    assert len(cap.calls[0]["y"]) == 5


# ----- plots ---------------------------------------------------------------------------------------------

def _curve_study():
    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in range(1, 10):
            trial.report(value=(x + 0.1) * (1 + 5.0 / step), step=step)
            if trial.should_prune():
                raise TrialPruned()
        return (x + 0.1) * (1 + 5.0 / 9)

    s = create_study(sampler=RandomSampler(seed=4), pruner=ASHAPruner(min_resource=1, reduction_factor=3))
    s.optimize(objective, n_trials=10)
    return s


def test_plots_draw_pruned_trials_and_intermediate_curves(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from trainpatterns.tuning import plots

    figures = []
    original = plots._save

    def keep(fig, path):
        figures.append(fig)
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    s = _curve_study()
    trials = s.trials
    done = [t for t in trials if t.state is TrialState.COMPLETE]
    pruned = [t for t in trials if t.state is TrialState.PRUNED]
    assert done and pruned
    out = plots.plot_optimization_history(s, tmp_path / "h.png")
    assert out.stat().st_size > 1000
    ax = figures[-1].axes[0]
    points = {c.get_label(): c.get_offsets() for c in ax.collections}
    np.testing.assert_array_equal(points["complete trial"], [(t.number, t.value) for t in done])
    np.testing.assert_array_equal(points["pruned trial (last reported value)"],
                                  [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in pruned])
    (best,) = [ln for ln in ax.lines if ln.get_label() == "best so far"]
    np.testing.assert_array_equal(best.get_ydata()[:-1], np.minimum.accumulate([t.value for t in done]))
    assert best.get_xdata()[-1] == trials[-1].number

    out = plots.plot_intermediate_values(s, tmp_path / "i.png")
    assert out.stat().st_size > 1000
    ax = figures[-1].axes[0]
    assert len(ax.lines) == len(trials)
    for t, line in zip(trials, ax.lines):
        steps = sorted(t.intermediate_values)
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_array_equal(line.get_ydata(), [t.intermediate_values[k] for k in steps])
        assert (line.get_color() == "0.6") == (t.state is TrialState.PRUNED)
    crosses = np.concatenate([c.get_offsets() for c in ax.collections])
    np.testing.assert_array_equal(crosses, [(t.last_step, t.value) for t in pruned])


def test_plots_of_a_study_with_nothing_to_draw_say_so(tmp_path):
    pytest.importorskip("matplotlib")
    from trainpatterns.tuning import plots

    s = create_study(sampler=RandomSampler(seed=0))
    with pytest.raises(ValueError, match="no COMPLETE or PRUNED trial"):
        plots.plot_optimization_history(s, tmp_path / "h.png")
    with pytest.raises(ValueError, match="no trial with reported"):
        plots.plot_intermediate_values(s, tmp_path / "i.png")
    assert not list(tmp_path.iterdir())
