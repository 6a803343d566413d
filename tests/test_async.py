"""AsyncDataParallel (parameter servers over torch.distributed.rpc) against independent references.

Each scenario of tests/_async_worker.py is one 2- or 3-process launch on 127.0.0.1 (tests/_ranks.py,
with a hard timeout), run once per module and shared by the tests that read it. References are
plain single-process training on the same batch sequence (same seeds): exact where the design says
it must be (one worker, ``max_staleness=0``), a validation MSE where staleness makes runs differ.

The convergence reference is single-process training at twice the batch (each step one batch from
each worker's half, drawn with the workers' seeds), not a SyncDataParallel launch: 2-rank
SyncDataParallel on batch B per rank is exactly that computation (tests/test_distributed_sync.py
checks the equality), and one process costs no third launch and adds no scheduling noise.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trainpatterns as tp
from trainpatterns import FusedAdamW
from trainpatterns.checkpoint import CheckpointManager
from trainpatterns.distributed import AsyncDataParallel

sys.path.insert(0, str(Path(__file__).parent))
import _async_worker as W  # noqa: E402
from _ranks import run_ranks  # noqa: E402

WORKER = str(Path(__file__).with_name("_async_worker.py"))
LAUNCH_TIMEOUT_S = 60.0  # per launch; a healthy one takes 3-8 s on 2 idle cores


class Run:
    """One launch: per rank its exit code, stderr and saved results (None where it saved none)."""

    def __init__(self, scenario: str, outdir: Path) -> None:
        start = time.monotonic()
        world = W.SCENARIOS[scenario]["world"]
        self.ranks = run_ranks([WORKER, scenario, str(outdir)], world=world, timeout_s=LAUNCH_TIMEOUT_S)
        self.seconds = time.monotonic() - start
        self.rc = [r[0] for r in self.ranks]
        self.err = [r[2] for r in self.ranks]
        files = [outdir / f"{scenario}_rank{r}.pt" for r in range(world)]
        self.data = [torch.load(f, weights_only=False) if f.exists() else None for f in files]

    def ok(self) -> list:
        """Every rank's results, after checking that every rank exited 0."""
        for rank, (rc, _, err) in enumerate(self.ranks):
            assert rc == 0, f"rank {rank} exited {rc}:\n{err[-3000:]}"
        return self.data

    def last_error(self, rank: int) -> str:
        """The last line of a rank's stderr that starts with an exception name."""
        lines = [ln for ln in self.err[rank].splitlines() if ln.split(":")[0].endswith(("Error", "Exception"))]
        return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    runs: dict = {}

    def get(scenario: str) -> Run:
        if scenario not in runs:
            runs[scenario] = Run(scenario, tmp_path_factory.mktemp(scenario))
        return runs[scenario]
    return get


def reference(steps: int, workers: int = 1, optimizer=FusedAdamW, wire: Optional[torch.dtype] = None) -> tuple:
    """Single-process training: each step one batch from each worker's part (the workers' seeds),
    concatenated; gradients rounded to ``wire`` first when given. (final state, losses)."""
    model = W.make_model(0)
    opt = optimizer(model.parameters(), lr=W.LR)
    x, y = W.train_data()
    parts = [W.worker_part(x, y, w, workers) for w in range(workers)]
    gens = [torch.Generator().manual_seed(W.worker_seed(w)) for w in range(workers)]
    losses = []
    for _ in range(steps):
        rows = [W.batch_rows(g, px.shape[0]) for (px, _), g in zip(parts, gens)]
        xb = torch.cat([px[r] for (px, _), r in zip(parts, rows)])
        yb = torch.cat([py[r] for (_, py), r in zip(parts, rows)])
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        if wire is not None:
            for p in model.parameters():
                p.grad = p.grad.to(wire).float()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.state_dict(), losses


def val_mse(state: dict) -> float:
    model = W.make_model(0)
    model.load_state_dict(state)
    x, y = W.val_data()
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k}: max difference {(a[k] - b[k]).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def workers_of(run: Run) -> list:
    return [d for d in run.data if d is not None and not d["server"]]


# ----- exactness without staleness -------------------------------------------------------------

def test_one_worker_without_staleness_is_single_process_training(launch, one_thread):
    """1 server + 1 worker, max_staleness=0: bit-for-bit FusedAdamW single-process training (the same
    kernel on the same gradients), within 1e-6 of torch.optim.AdamW; every gradient fresh."""
    server, worker = launch("equiv").ok()
    total = W.SCENARIOS["equiv"]["total"]
    ref, ref_losses = reference(total)
    assert worker["losses"] == ref_losses
    assert_same(worker["final"], ref)
    torch_ref, _ = reference(total, optimizer=torch.optim.AdamW)
    assert_same(worker["final"], torch_ref, atol=1e-6)
    for d in (server, worker):
        stats = d["stats"]
        assert stats["staleness"] == {0: total} and stats["updates"] == total and stats["refused"] == 0
        assert stats["workers"][0]["updates"] == total and stats["workers"][0]["rows"] == total * W.BATCH
        assert stats["dropped"] == []


def test_two_shards_bf16_wire_is_single_process_on_rounded_gradients(launch, one_thread):
    """2 servers (the model sharded) + 1 worker, max_staleness=0, compress='bf16': exactly
    single-process training whose gradients are rounded to bfloat16 before each step."""
    data = launch("equiv2").ok()
    total = W.SCENARIOS["equiv2"]["total"]
    ref, ref_losses = reference(total, wire=torch.bfloat16)
    worker = workers_of(launch("equiv2"))[0]
    assert worker["losses"] == ref_losses
    assert_same(worker["final"], ref)
    unrounded, _ = reference(total)
    assert any(not torch.equal(ref[k], unrounded[k]) for k in ref)  # the rounding is visible
    shards = data[0]["stats"]["shards"]
    assert [s["server"] for s in shards] == [0, 1]
    assert all(s["updates"] == total and s["staleness"] == {0: total} for s in shards)
    assert data[0]["stats"]["staleness"] == {0: total}  # server 0's figures at the top level


# ----- staleness -------------------------------------------------------------------------------

def test_staleness_bound_holds(launch):
    data = launch("bounded").ok()
    bound, total = W.SCENARIOS["bounded"]["max_staleness"], W.SCENARIOS["bounded"]["total"]
    for d in data:
        stats = d["stats"]
        assert stats["updates"] == total
        assert max(stats["staleness"]) <= bound, stats["staleness"]
        assert sum(stats["staleness"].values()) == total
        assert sum(w["updates"] for w in stats["workers"].values()) == total


def test_unbounded_staleness_is_real(launch):
    data = launch("free").ok()
    total = W.SCENARIOS["free"]["total"]
    stats = data[0]["stats"]
    assert stats["updates"] == total and sum(stats["staleness"].values()) == total
    assert max(stats["staleness"]) > 0, stats["staleness"]
    assert sorted(stats["workers"]) == [0, 1] and all(w["updates"] > 0 for w in stats["workers"].values())


# ----- convergence --------------------------------------------------------------------------

def test_two_workers_converge_like_synchronous_training(launch, one_thread):
    """Two workers on their own halves reach a validation MSE within 2x of synchronous training
    (batch from each half per step) after the same number of applied gradients."""
    data = launch("free").ok()
    ref, _ = reference(W.SCENARIOS["free"]["total"], workers=2)
    initial, target = val_mse(W.make_model(0).state_dict()), val_mse(ref)
    assert target < 0.1 * initial  # the reference itself learned
    assert val_mse(data[0]["final"]) <= 2 * target


def test_bf16_wire_with_staleness_converges(launch, one_thread):
    data = launch("bounded").ok()
    ref, _ = reference(W.SCENARIOS["bounded"]["total"], workers=2)
    assert val_mse(data[0]["final"]) <= 2 * val_mse(ref)
    for d in workers_of(launch("bounded")):
        losses = d["losses"]
        assert sum(losses[-20:]) < 0.2 * sum(losses[:20])


# ----- one truth at the end --------------------------------------------------------------------

@pytest.mark.parametrize("scenario", ["equiv", "equiv2", "bounded", "free", "straggler", "gather"])
def test_every_rank_ends_with_the_same_parameters(launch, scenario):
    data = launch(scenario).ok()
    for d in data[1:]:
        assert_same(d["final"], data[0]["final"])
    assert any(not torch.equal(data[0]["final"][k], data[0]["initial"][k]) for k in data[0]["final"])
    settled = ("updates", "refused", "staleness", "dropped")  # fixed once the budget is spent
    for d in data[1:]:
        assert {k: d["stats"][k] for k in settled} == {k: data[0]["stats"][k] for k in settled}


def test_a_server_gathering_gradients_steps_on_their_mean(launch):
    # apply_every=3 (or 30 ms after the first arrival): the budget counts steps, each of 1 to 3
    # gradients, so more gradients arrive than steps are made, and never more than 3 per step.
    data = launch("gather").ok()
    stats = data[0]["stats"]
    gradients = sum(w["updates"] for w in stats["workers"].values())
    assert stats["updates"] == W.SCENARIOS["gather"]["total"]
    assert stats["updates"] < gradients <= 3 * stats["updates"] + 2  # the last step's extras are refused as done
    assert sum(stats["staleness"].values()) == gradients


# ----- a worker dies ---------------------------------------------------------------------------

def test_killed_worker_is_dropped_and_the_budget_spent(launch):
    run = launch("kill")
    timeout = W.SCENARIOS["kill"]["timeout"]
    assert run.rc[2] == 17, run.err[2][-2000:]  # the worker that died after KILL_STEP steps
    assert run.rc[0] == 0, run.err[0][-3000:]
    stats = run.data[0]["stats"]
    assert stats["dropped"] == [1]
    assert stats["updates"] == W.SCENARIOS["kill"]["total"]
    assert sum(w["updates"] for w in stats["workers"].values()) == stats["updates"]
    assert stats["workers"][1]["updates"] <= W.KILL_STEP
    assert any("worker 1 (rank 2)" in w and "dropped" in w and f"{timeout:g} s" in w for w in run.data[0]["warnings"])
    assert run.seconds < LAUNCH_TIMEOUT_S


def test_killed_worker_the_survivor_finishes(launch):
    run = launch("kill")
    assert run.rc[1] == 0, run.err[1][-3000:]
    stats = run.data[1]["stats"]
    assert stats["dropped"] == [1] and stats["updates"] == W.SCENARIOS["kill"]["total"]
    assert_same(run.data[1]["final"], run.data[0]["final"])


# ----- a straggler -----------------------------------------------------------------------------

def steps_per_s(times: list, skip: int = 10) -> float:
    """Steady-state speed: the first ``skip`` steps (warm-up) left out."""
    return (len(times) - 1 - skip) / (times[-1] - times[skip])


def test_straggler_does_not_slow_the_fast_worker(launch):
    """Worker 1 sleeps 5x its step time after each step; worker 0's steps/s stays within 20% of its
    speed when both are fast. A property of the design (no worker waits for another), not a speed
    benchmark: waiting would cost ~6x, and the 20% margin is generous against that, while a busy
    box still leaves it room (the straggler run has fewer pushes competing for the 2 cores)."""
    launch("free").ok()
    launch("straggler").ok()
    fast, slow = workers_of(launch("free")), workers_of(launch("straggler"))
    both_fast = steps_per_s(fast[0]["times"])
    beside_straggler = steps_per_s(slow[0]["times"])
    straggler = steps_per_s(slow[1]["times"])
    assert straggler < 0.5 * beside_straggler  # the scenario really has a straggler
    assert beside_straggler >= 0.8 * both_fast, (beside_straggler, both_fast)


# ----- a server restarts from its checkpoint ---------------------------------------------------

class _Shard(nn.Module):
    """The layout the server checkpoints its shard in: one ParameterList, in the model's order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for p in model.parameters()])


@pytest.fixture(scope="module")
def restart(tmp_path_factory):
    """Run 1 (its server dies at update KILL_VERSION), the checkpoints it left, run 2 (same dir)."""
    outdir = tmp_path_factory.mktemp("restart")
    first = Run("restart1", outdir)
    manager = CheckpointManager(outdir / "ckpt" / "server_0")
    saved = [info.step for info in manager.list() if info.valid]
    shard = _Shard(W.make_model(0))
    if saved:
        manager.load_weights(shard, saved[-1], key="shard")
    second = Run("restart2", outdir)
    return first, saved, shard, second


def test_server_restart_resumes_from_its_checkpoint(restart):
    first, saved, shard, second = restart
    total = W.SCENARIOS["restart2"]["total"]
    assert first.rc[0] == 9, first.err[0][-2000:]
    for rank in (1, 2):
        assert first.rc[rank] not in (0, None), first.err[rank][-2000:]
        assert "server 0 (rank 0) did not answer" in first.err[rank]
    assert saved and saved[-1] % W.SAVE_EVERY == 0 and saved[-1] < W.KILL_VERSION
    resumed = saved[-1]
    data = second.ok()
    expected = dict(zip(W.make_model(0).state_dict(), (p.detach() for p in shard.params)))
    for d in workers_of(second):
        assert_same(d["initial"], expected)  # the first version served is the saved one
    stats = data[0]["stats"]
    assert stats["updates"] == total
    assert sum(w["updates"] for w in stats["workers"].values()) == total - resumed  # run 2's own updates
    assert sum(stats["staleness"].values()) == total  # the saved counters continued
    for d in data[1:]:
        assert_same(d["final"], data[0]["final"])


# ----- bad input -------------------------------------------------------------------------------

@pytest.fixture
def rank_env(monkeypatch):
    """torchrun's rank variables without a rendezvous address: a constructor that got past its
    checks fails at once (RuntimeError naming MASTER_ADDR) instead of waiting for peers."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)

    def set_rank(rank: int, world: int) -> None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
    return set_rank


def adamw(params):
    return FusedAdamW(params, lr=1e-3)


@pytest.mark.parametrize("world,num_servers", [(2, 2), (3, 3), (3, 5)])
def test_no_worker_left_is_a_value_error_on_every_rank(rank_env, world, num_servers):
    for rank in range(world):
        rank_env(rank, world)
        with pytest.raises(ValueError, match=f"num_servers={num_servers} leaves no worker among {world} ranks"):
            AsyncDataParallel(W.make_model(), optimizer=adamw, num_servers=num_servers)


@pytest.mark.parametrize("rank", [0, 1])
def test_optimizer_instance_is_a_type_error(rank_env, rank):
    rank_env(rank, 2)
    model = W.make_model()
    with pytest.raises(TypeError, match="optimizer must be a factory"):
        AsyncDataParallel(model, optimizer=FusedAdamW(model.parameters(), lr=1e-3))


BAD = [("max_staleness", -1), ("max_staleness", 1.5), ("max_staleness", True), ("max_staleness", "2"),
       ("staleness_lr", "linear"), ("staleness_lr", 0.5), ("compress", "bf8"), ("compress", torch.bfloat16),
       ("pull_every", 0), ("total_updates", 0), ("num_servers", 0), ("save_every", 0), ("timeout", 0),
       ("timeout", -1.0), ("timeout", "60")]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_setting_is_a_value_error_naming_it(rank_env, name, value):
    rank_env(1, 2)
    with pytest.raises(ValueError, match=f"AsyncDataParallel: {name} must be"):
        AsyncDataParallel(W.make_model(), optimizer=adamw, **{name: value})


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["max_staleness", "pull_every", "total_updates", "save_every"]),
       value=st.integers(max_value=-1) | st.floats(allow_nan=True) | st.text(max_size=4))
def test_any_bad_count_is_a_value_error_naming_it(name, value):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MASTER_ADDR", raising=False)
        mp.setenv("RANK", "1")
        mp.setenv("WORLD_SIZE", "2")
        with pytest.raises(ValueError, match=f"{name} must be an int"):
            AsyncDataParallel(W.make_model(), optimizer=adamw, **{name: value})


def test_wrong_role_calls_are_runtime_errors(launch):
    server, worker = launch("equiv").ok()
    assert server["misuse"]["forward"][0] == "RuntimeError" and "is a server" in server["misuse"]["forward"][1]
    assert server["misuse"]["step"][0] == "RuntimeError" and "is a server" in server["misuse"]["step"][1]
    assert worker["misuse"]["serve"][0] == "RuntimeError" and "is a worker" in worker["misuse"]["serve"][1]
    for d in (server, worker):
        assert d["misuse"]["stats"][0] == "RuntimeError" and "after finish()" in d["misuse"]["stats"][1]


def test_model_mismatch_fails_the_server_naming_it(launch):
    """Worker 1 (rank 2) builds a 33-wide hidden layer: the server and that worker exit non-zero within
    the timeout, the server's error naming the differing parameter and both shapes."""
    run = launch("mismatch")
    assert None not in run.rc, "a rank hung"
    assert run.rc[0] not in (0, None) and run.rc[2] not in (0, None)
    line = run.last_error(0)
    assert line.startswith("ValueError") and "0.weight" in line and "[33, 2]" in line and "[32, 2]" in line, line


def test_model_mismatch_fails_every_rank_naming_it(launch):
    run = launch("mismatch")
    for rank in range(3):
        line = run.last_error(rank)
        assert run.rc[rank] not in (0, None) and "[33, 2]" in line and "[32, 2]" in line, (rank, line)


def test_a_server_killed_under_torchrun_restarts_resumes_from_its_checkpoint(tmp_path):
    # torchrun --max-restarts with its shared store (which outlives the group): the restarted
    # incarnation must rendezvous in its own key space and its server resume from the checkpoint.
    import subprocess

    job = Path(__file__).with_name("_async_restart_job.py")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(tp.__file__).resolve().parent.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                          "--nproc-per-node", "3", "--max-restarts", "2", str(job), str(tmp_path / "ckpt")],
                         env=env, capture_output=True, text=True, timeout=150)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "incarnation 0: server starts at version 0" in log
    # killed inside its 150th step, before that update's save: the newest checkpoint is 100
    assert "incarnation 1: server starts at version 100" in log, log[-4000:]
    for rank in range(3):
        assert f"incarnation 1: rank {rank} ends with 300 updates" in log, log[-4000:]
