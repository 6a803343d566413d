"""GPSampler at scale and with parallel workers: the extended Cholesky factor against dense
references, the schedule of kernel refits, and pending (RUNNING) trials steering proposals apart,
in one process and across worker processes that claim at the same moment.

"Near-duplicate" below means closer than 1e-3 in the unit cube (a thousandth of every range):
proposals blind to each other land within 1e-4 of one another, proposals that see each other as
pending at least 4e-3 apart (Branin and Hartmann6, 4 seeds each).
"""
from __future__ import annotations

import itertools
import math
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trainpatterns
from trainpatterns.tuning import FloatDistribution, GPSampler, TrialState, create_study
from trainpatterns.tuning.gp_model import GaussianProcess

PYTHON_DIR = str(Path(trainpatterns.__file__).resolve().parents[1])
NEAR = 1e-3


def branin(trial) -> float:
    x = trial.suggest_float("x", -5.0, 10.0)
    y = trial.suggest_float("y", 0.0, 15.0)
    return (y - 5.1 / (4 * math.pi ** 2) * x * x + 5 / math.pi * x - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x) + 10


def _unit(space: dict, params: dict) -> np.ndarray:
    return np.array([d.to_unit(params[k]) for k, d in sorted(space.items())])


def _min_distance(space: dict, points: list) -> float:
    return min(float(np.linalg.norm(_unit(space, p) - _unit(space, q))) for p, q in itertools.combinations(points, 2))


# ----- the extended factor ---------------------------------------------------------------------------

def _dense_reference(gp: GaussianProcess, xs: np.ndarray) -> tuple:
    """(c, b) of the prior mean by GLS, and the posterior mean and variance at ``xs``, from the
    explicit kernel matrix and dense solves in torch (the GP's own kernel parameters)."""
    x, y = torch.from_numpy(gp.x), torch.from_numpy(gp.y)
    a = torch.from_numpy(gp.inv_sq_ls)

    def k(p, q):
        d2 = ((p[:, None] - q[None]) ** 2 * a).sum(-1)
        r = torch.sqrt(d2 + 1e-300)
        return gp.signal * (1 + math.sqrt(5) * r + 5 / 3 * d2) * torch.exp(-math.sqrt(5) * r)

    def basis(p):
        return torch.stack([torch.ones(len(p), dtype=torch.float64),
                            ((p[:, torch.from_numpy(gp.mean_columns)] - 0.5) ** 2).sum(1)], 1)

    kxx = k(x, x) + gp.noise * torch.eye(len(x), dtype=torch.float64)
    h = basis(x)
    beta = torch.linalg.solve(h.T @ torch.linalg.solve(kxx, h), h.T @ torch.linalg.solve(kxx, y))
    if beta[1] <= 0:  # the GLS constant alone, as the model falls back to
        kinv_1 = torch.linalg.solve(kxx, torch.ones(len(x), dtype=torch.float64))
        beta = torch.stack([kinv_1 @ y / kinv_1.sum(), torch.zeros((), dtype=torch.float64)])
    p = torch.from_numpy(xs)
    ks = k(p, x)
    mean = basis(p) @ beta + ks @ torch.linalg.solve(kxx, y - h @ beta)
    var = (gp.signal - (ks * torch.linalg.solve(kxx, ks.T).T).sum(1)).clamp_min(1e-12)
    return beta.numpy(), mean.numpy(), var.numpy()


@settings(max_examples=40, deadline=None)
@given(n0=st.integers(1, 40), k=st.integers(1, 5), dim=st.integers(1, 4), clustered=st.booleans(),
       deterministic=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_extended_factor_matches_a_dense_reference(n0, k, dim, clustered, deterministic, seed):
    rng = np.random.default_rng(seed)
    x = rng.random((n0 + k, dim))
    if clustered:  # the new rows a thousandth from old ones: what a search refining its incumbent adds
        x[n0:] = np.clip(x[rng.integers(0, n0, k)] + 1e-3 * rng.standard_normal((k, dim)), 0.0, 1.0)
    y = np.sin(5 * x).sum(1) + 2.0 * ((x - 0.5) ** 2).sum(1)
    y = (y - y.mean()) / (y.std() + 1e-12)
    raw = np.concatenate([rng.uniform(-1.0, 2.0, dim), [rng.uniform(-0.5, 0.5)], [math.log(1e-3)]])
    cols = np.ones(dim, dtype=bool)
    base = GaussianProcess(x[:n0], y[:n0], raw, deterministic=deterministic, mean_columns=cols)
    with mock.patch.object(GaussianProcess, "_factor", autospec=True, side_effect=GaussianProcess._factor) as full:
        gp = GaussianProcess(x, y, raw, deterministic=deterministic, mean_columns=cols, extends=base)
    xs = np.concatenate([rng.random((6, dim)), x[-1:] + 1e-4])
    beta, mean_ref, var_ref = _dense_reference(gp, xs)
    mean, var = gp.posterior(xs)
    scale = max(1.0, float(np.abs(mean_ref).max()))
    assert np.allclose(gp.mean_coef, beta, rtol=1e-6, atol=1e-7 * scale)
    assert np.allclose(mean, mean_ref, rtol=1e-6, atol=1e-7 * scale)
    assert np.allclose(var, var_ref, rtol=1e-5, atol=1e-8)
    assert np.allclose(np.tril(gp.chol_inv), gp.chol_inv)  # still lower-triangular
    assert full.call_count == 0  # extended, not refactorised


def test_a_gp_extends_only_a_factor_of_its_own_kernel_and_first_rows():
    rng = np.random.default_rng(0)
    x, y = rng.random((12, 2)), rng.standard_normal(12)
    raw = np.array([0.5, 0.2, 0.0, math.log(1e-2)])
    base = GaussianProcess(x[:8], y[:8], raw, deterministic=False)
    for other in (GaussianProcess(x[:8], y[:8], raw + 0.1, deterministic=False),       # another kernel
                  GaussianProcess(x[1:9], y[1:9], raw, deterministic=False),           # not the first rows
                  GaussianProcess(x[:8], y[:8], raw, deterministic=True)):             # another noise
        gp = GaussianProcess(x, y, raw, deterministic=False, extends=other)
        ref = GaussianProcess(x, y, raw, deterministic=False)
        assert np.allclose(gp.chol_inv, ref.chol_inv, rtol=1e-10, atol=1e-10)
    gp = GaussianProcess(x, y, raw, deterministic=False, extends=base)
    assert np.allclose(gp.posterior(x[:3])[0], GaussianProcess(x, y, raw, deterministic=False).posterior(x[:3])[0],
                       rtol=1e-9, atol=1e-9)


# ----- refits ----------------------------------------------------------------------------------------

def _counting_fits(monkeypatch) -> list:
    """Patch GaussianProcess.fit to record the number of observations of every fit."""
    fits: list = []
    fit = GaussianProcess.fit.__func__

    def counting(cls, x, y, **kw):
        fits.append(len(y))
        return fit(cls, x, y, **kw)

    monkeypatch.setattr(GaussianProcess, "fit", classmethod(counting))
    return fits


@pytest.mark.parametrize("growth, sizes", [(0.01, range(10, 102)), (0.1, range(10, 60)), (0.0, range(10, 30))])
def test_kernel_refits_follow_the_growth_schedule(monkeypatch, growth, sizes):
    # Refit once the observations have grown by `growth` (at least one) since the last fit: with the
    # default 1%, every trial up to 100 observations, so studies of 100 trials are modelled as before.
    fits = _counting_fits(monkeypatch)
    rng = np.random.default_rng(1)
    space = {"a": FloatDistribution(0.0, 1.0), "b": FloatDistribution(-2.0, 2.0)}
    params = [{"a": float(u), "b": float(v)} for u, v in rng.random((max(sizes), 2)) * [1.0, 4.0] - [0.0, 2.0]]
    values = [p["a"] ** 2 + math.sin(3 * p["b"]) for p in params]
    sampler = GPSampler(seed=0, deterministic_objective=True, refit_growth=growth, n_candidates=16, n_local_search=0)
    expected, last = [], None
    for n in sizes:
        sampler.propose(space, params[:n], values[:n], [], n)
        sampler.propose(space, params[:n], values[:n], [], n)  # the same observations again: no refit
        if last is None or n - last >= max(1.0, growth * last):
            expected.append(n)
            last = n
    assert fits == expected
    if growth == 0.01:
        assert fits == list(sizes)


def test_a_kept_kernel_that_the_new_rows_make_singular_is_refitted(monkeypatch):
    fits = _counting_fits(monkeypatch)
    rng = np.random.default_rng(2)
    space = {"a": FloatDistribution(0.0, 1.0)}
    params = [{"a": float(u)} for u in rng.random(22)]
    values = [math.sin(6 * p["a"]) for p in params]
    sampler = GPSampler(seed=0, deterministic_objective=True, refit_growth=0.5, n_candidates=16, n_local_search=0)
    sampler.propose(space, params[:20], values[:20], [], 20)

    def singular(self, base):
        raise np.linalg.LinAlgError("not positive definite")

    monkeypatch.setattr(GaussianProcess, "_extended_factor", singular)
    out = sampler.propose(space, params[:21], values[:21], [], 21)  # within the growth: kept, but singular
    assert fits == [20, 21]
    assert 0.0 <= out["a"] <= 1.0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.1", None, True])
def test_bad_refit_growth_is_refused(bad):
    with pytest.raises(ValueError, match="refit_growth must be a fraction in"):
        GPSampler(refit_growth=bad)


# ----- pending trials --------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 3])
def test_suggestions_made_while_the_first_trial_runs_are_not_near_duplicates(seed):
    s = create_study(sampler=GPSampler(seed=seed, deterministic_objective=True))
    s.optimize(branin, n_trials=20)
    done = s.trials
    space = {k: done[0].distributions[k] for k in ("x", "y")}
    running = [s.ask() for _ in range(4)]  # none has suggested anything: only its proposal is known
    stored = {t.number: t for t in s.trials}
    proposals = [stored[t.number].system_attrs["proposal"] for t in running]
    assert all(stored[t.number].state is TrialState.RUNNING for t in running)
    assert _min_distance(space, proposals) >= NEAR
    # The same sampler, blind to the running trials, proposes near-duplicates for the same trials:
    # what seeing them as pending changed.
    blind = [s.sampler.propose(space, [t.params for t in done], [t.value for t in done], [], t.number)
             for t in running]
    assert _min_distance(space, blind) < NEAR
    # A running trial takes its proposal; the stored proposal goes when the trial finishes.
    t = running[0]
    assert (t.suggest_float("x", -5.0, 10.0), t.suggest_float("y", 0.0, 15.0)) == (proposals[0]["x"], proposals[0]["y"])
    s.tell(t, 1.0)
    assert "proposal" not in s.trials[t.number].system_attrs


def test_a_running_enqueued_trial_counts_as_pending_at_its_fixed_point():
    s = create_study(sampler=GPSampler(seed=2, deterministic_objective=True))
    s.optimize(branin, n_trials=20)
    done = s.trials
    space = {k: done[0].distributions[k] for k in ("x", "y")}
    # Enqueue the very point the GP would propose next, and claim it without suggesting anything.
    target = s.sampler.propose(space, [t.params for t in done], [t.value for t in done], [], 21)
    s.enqueue_trial(target)
    first = s.ask()
    assert first.number == 20
    second = s.ask()
    proposal = s.trials[second.number].system_attrs["proposal"]
    assert _min_distance(space, [target, proposal]) >= NEAR


def bowl_objective(trial) -> float:
    """Top-level (picklable) objective for worker processes: a 3-D bowl. Each trial ends on the next
    whole half-second, so the workers' trials end together and their next claims collide."""
    x = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(3)]
    time.sleep(0.5 - time.time() % 0.5 + 0.01)
    return sum((v - 0.3) ** 2 for v in x)


@pytest.mark.timeout(240)
def test_worker_processes_claiming_together_do_not_propose_near_duplicates(tmp_path):
    s = create_study(storage=tmp_path / "p.db", study_name="p",
                     sampler=GPSampler(seed=0, n_startup_trials=8, deterministic_objective=True))
    s.optimize(lambda t: sum((t.suggest_float(f"x{i}", 0.0, 1.0) - 0.3) ** 2 for i in range(3)), n_trials=8)
    s.optimize(bowl_objective, n_trials=9, n_jobs=3)
    trials = s.trials
    assert len(trials) == 17 and all(t.state is TrialState.COMPLETE for t in trials)
    space = trials[0].distributions
    gp = trials[8:]
    # Trials that ran at the same time: each proposal saw the others as pending.
    together = [(p, q) for p, q in itertools.combinations(gp, 2)
                if p.datetime_start < q.datetime_complete and q.datetime_start < p.datetime_complete]
    assert len(together) >= 6
    for p, q in together:
        assert _min_distance(space, [p.params, q.params]) >= NEAR, (p.number, q.number)


TURN_WORKER = r'''
import sys, time
sys.path.insert(0, {python_dir!r})
import threading
from trainpatterns.tuning.turns import proposal_turn
db, hold, log = sys.argv[1], float(sys.argv[2]), sys.argv[3]
with proposal_turn(threading.Lock(), db, 60.0):
    t0 = time.time()
    print("in", flush=True)
    time.sleep(hold)
    with open(log, "a") as f:
        f.write(f"{{t0}} {{time.time()}}\n")
'''


@pytest.mark.timeout(120)
def test_processes_take_turns_and_a_killed_holder_releases_its_turn(tmp_path, caplog):
    import threading

    from trainpatterns.tuning.turns import proposal_turn

    script = tmp_path / "turn.py"
    script.write_text(TURN_WORKER.format(python_dir=PYTHON_DIR))
    db, log = str(tmp_path / "s.db"), tmp_path / "turns.log"

    def start(hold: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), db, str(hold), str(log)], stdout=subprocess.PIPE,
                                text=True)

    procs = [start(0.4) for _ in range(3)]
    try:
        for p in procs:
            assert p.wait(timeout=90) == 0
    finally:
        for p in procs:
            p.kill()
    spans = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(spans) == 3
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert begin >= end - 1e-3, spans  # one at a time
    holder = start(60.0)
    try:
        assert holder.stdout.readline().strip() == "in"
        # A live holder past the wait limit: this worker goes on without its turn, and says so.
        t0 = time.monotonic()
        with proposal_turn(threading.Lock(), db, 0.5):
            waited = time.monotonic() - t0
        assert 0.5 <= waited < 5.0
        assert "proposing without it" in caplog.text
        # A holder killed inside its turn: the next worker gets the turn at once.
        holder.kill()
        holder.wait(timeout=30)
        t0 = time.monotonic()
        with proposal_turn(threading.Lock(), db, 30.0):
            waited = time.monotonic() - t0
        assert waited < 1.0
    finally:
        holder.kill()


def test_a_lock_file_that_cannot_be_opened_only_costs_the_turns(tmp_path, caplog):
    import threading

    from trainpatterns.tuning.turns import proposal_turn

    lock = threading.Lock()
    with proposal_turn(lock, str(tmp_path / "missing" / "s.db"), 1.0):
        assert lock.locked()  # the threads of this process still take turns
    assert not lock.locked()
    assert "proposing without taking turns with other processes" in caplog.text
