"""Worker side of tests/test_distributed_sync.py: the training scenarios one rank runs, and their
single-process references (run by the test itself on the concatenated batches).

Run as ``python tests/_sync_worker.py SCENARIO OUTDIR`` with torchrun's variables set (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); it joins the job with
``trainpatterns.distributed.init_from_env`` and saves what the test checks to
``OUTDIR/SCENARIO_rank{RANK}.pt``. Scenario "all" runs every training scenario in one process pair
(process start-up dominates the cost); "trainer" runs ``Trainer.fit`` on the CLI's built-in task;
"die" and "stall" make rank 1 exit or hang in the middle of a backward.
"""
from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

WORLD = 2
STEPS = 3
BATCH = 6  # per rank


# ----- models and data (shared by the ranks and the references) ---------------------------------

class Irregular(nn.Module):
    """Odd sizes, a frozen layer, a branch only some batches use, a layer nothing uses."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(13, 37)
        self.frozen = nn.Linear(37, 37)
        self.frozen.requires_grad_(False)
        self.branch = nn.Linear(37, 37)
        self.never = nn.Linear(37, 3)
        self.out = nn.Linear(37, 5)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.frozen(h))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.out(h)


class Tiny(nn.Module):
    """One large matrix (bigger than a small bucket) and many tiny parameters, in float32 and float64."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(13, 20011)
        self.tiny = nn.ParameterList([nn.Parameter(torch.randn(3)) for _ in range(60)])
        self.head = nn.Linear(20011, 5)
        self.scale64 = nn.Parameter(torch.ones(5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.big(x))
        y = self.head(h)
        t = torch.stack(list(self.tiny)).sum(0).sum()
        return (y + t) * self.scale64.float()


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Irregular() if kind == "irregular" else Tiny()


def batch(step: int, micro: int = 0):
    """The global batch of a step: WORLD * BATCH rows; rank r trains on rows [r*BATCH, (r+1)*BATCH)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(WORLD * BATCH, 13, generator=g), torch.randn(WORLD * BATCH, 5, generator=g)


def uses_branch(step: int, rank: int) -> bool:
    """Rank 0 uses the branch on even steps, rank 1 never: the branch is unused on some ranks and,
    on odd steps, on all of them."""
    return rank == 0 and step % 2 == 0


def mse(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((y - t) ** 2).mean()


def make_optimizer(kind: str, params):
    import trainpatterns as tp

    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if kind == "fused_adamw":
        return tp.FusedAdamW(params, lr=1e-2, weight_decay=0.1)
    if kind == "sgd_small":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return torch.optim.SGD(params, lr=0.1)


# Scenario name -> (model, optimizer, SyncDataParallel kwargs, micro-batches per step under no_sync).
SCENARIOS = {
    "plain": ("irregular", "adamw", {}, 1),
    "bf16": ("irregular", "sgd", {"compress": "bf16"}, 1),
    "bf16_collective": ("irregular", "sgd", {"compress": "bf16", "p2p_ring": False}, 1),
    "fp16": ("irregular", "sgd", {"compress": "fp16"}, 1),
    "no_sync": ("irregular", "adamw", {}, 3),
    "buckets": ("tiny", "sgd_small", {"bucket_mb": 0.0001, "first_bucket_mb": 0.0001}, 1),
    "overlap_optim": ("irregular", "fused_adamw", {"bucket_mb": 0.002}, 1),
}


def loss_on(model, kind: str, step: int, micro: int, rows: slice, rank_of_rows: int) -> torch.Tensor:
    x, t = batch(step, micro)
    if kind == "irregular":
        return mse(model(x[rows], uses_branch(step, rank_of_rows)), t[rows])
    return mse(model(x[rows]), t[rows])


def reference(scenario: str) -> dict:
    """Single process, one model, each step on the concatenation of every rank's (micro-)batches."""
    kind, opt_kind, _, micros = SCENARIOS[scenario]
    model = make_model(kind)
    opt = make_optimizer(opt_kind, [p for p in model.parameters() if p.requires_grad])
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad_max = 0.0
    for step in range(STEPS):
        opt.zero_grad()
        # The mean over all rows of the step: each rank's slice weighs 1 / (WORLD * micros).
        loss = sum(loss_on(model, kind, step, m, slice(r * BATCH, (r + 1) * BATCH), r)
                   for m in range(micros) for r in range(WORLD)) / (WORLD * micros)
        loss.backward()
        grad_max = max([grad_max] + [p.grad.abs().max().item() for p in model.parameters() if p.grad is not None])
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "init": init,
            "grad_max": grad_max}


def run_scenario(scenario: str, rank: int) -> dict:
    from trainpatterns.distributed import SyncDataParallel

    kind, opt_kind, kwargs, micros = SCENARIOS[scenario]
    model = make_model(kind, seed=rank)  # rank 1 starts elsewhere: the wrap must broadcast rank 0's values
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(opt_kind, params)
    overlap = scenario == "overlap_optim"
    ddp = SyncDataParallel(model, optimizer=opt if overlap else None, **kwargs)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    for step in range(STEPS):
        opt.zero_grad()
        for m in range(micros):
            last = m == micros - 1
            with (ddp.no_sync() if not last else _nothing()):
                (loss_on(ddp, kind, step, m, rows, rank) / micros).backward()
        if not overlap:
            opt.step()
    grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "grads": grads,
            "buckets": ddp.bucket_params, "ring": ddp._ring is not None}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# The Trainer scenario: the CLI's built-in pendulum task, small.
TRAINER_JOB = dict(samples=512, hidden=16, seed=0)
TRAINER_BATCH = 32  # per rank
TRAINER_STEPS = 6  # 3 virtual epochs of 2 steps: 3 checkpoints


def trainer_model(seed: int) -> nn.Module:
    from trainpatterns.cli import DEFAULTS, Job

    torch.manual_seed(seed)
    return Job(dict(DEFAULTS, **TRAINER_JOB)).model()


def run_trainer(rank: int, outdir: str) -> dict:
    """``Trainer.fit`` under torchrun on the built-in task: the Trainer wraps the model in
    SyncDataParallel, gives each rank its own shard, and the ranks save checkpoints together."""
    from trainpatterns.checkpoint import VirtualEpochs
    from trainpatterns.cli import DEFAULTS, Job
    from trainpatterns.optim import FusedAdamW
    from trainpatterns.train import Trainer

    job = Job(dict(DEFAULTS, **TRAINER_JOB))
    model = trainer_model(seed=rank)  # rank 1 starts elsewhere: the wrap must broadcast rank 0's values
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = FusedAdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    n, batch = job.x.shape[0], TRAINER_BATCH * WORLD  # the plan counts examples over all ranks
    plan = VirtualEpochs(n, batch, stop_point=TRAINER_STEPS * batch / n, num_checkpoints=3)
    trainer = Trainer(model, job.loss_fn, opt, (job.x, job.y), (job.x_val, job.y_val),
                      checkpoint_dir=os.path.join(outdir, "trainer_run"), plan=plan, progress=False,
                      num_threads=1, async_save=False)
    history = trainer.fit()
    return {"wrapper": type(trainer.model).__name__, "steps": trainer.step, "history": history, "init": init,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def fail(rank: int, how: str) -> dict:
    """Rank 1 exits ("die") or hangs ("stall") inside its second backward, after launching some
    buckets; rank 0 must raise a clear error, at once for a dead peer, within the timeout for a
    silent one. With a "_bf16" suffix the buckets go through the ring (ring.py) instead of gloo's
    all-reduce."""
    import datetime

    import torch.distributed as dist
    from trainpatterns.distributed import SyncDataParallel

    # A group with a short timeout for the training collectives; the job itself was initialised
    # with a long one, so that slow process start-ups on a loaded machine cannot fail the rendezvous.
    seconds = float(os.environ.get("TP_TEST_GROUP_TIMEOUT", "3"))
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=seconds))
    model = make_model("irregular")
    ddp = SyncDataParallel(model, bucket_mb=0.002, process_group=group,
                           compress="bf16" if how.endswith("_bf16") else None)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)

    def misbehave(p):
        if step == 1:
            if how.startswith("die"):
                os._exit(3)
            time.sleep(120)

    if rank == 1:
        model.inp.weight.register_post_accumulate_grad_hook(misbehave)
    t0 = time.monotonic()
    try:
        for step in range(3):
            t0 = time.monotonic()
            loss_on(ddp, "irregular", step, 0, rows, rank).backward()
    except RuntimeError as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


FAILURES = ("die", "stall", "die_bf16", "stall_bf16")


def main() -> None:
    scenario, outdir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    from trainpatterns.distributed import init_from_env

    info = init_from_env(timeout=60.0)
    assert info.world_size == WORLD and info.backend == "gloo", info
    if scenario in FAILURES:
        out = fail(info.rank, scenario)
    elif scenario == "trainer":
        out = run_trainer(info.rank, outdir)
    else:
        names = list(SCENARIOS) if scenario == "all" else [scenario]
        out = {name: run_scenario(name, info.rank) for name in names}
    torch.save(out, os.path.join(outdir, f"{scenario}_rank{info.rank}.pt"))
    sys.stdout.flush()
    # Skip the interpreter's teardown: a process group whose peer died can block in its destructor.
    os._exit(0)


if __name__ == "__main__":
    main()
