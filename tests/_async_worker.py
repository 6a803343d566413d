"""Rank side of tests/test_async.py: one AsyncDataParallel job per scenario, on the pendulum task.

Run as ``python tests/_async_worker.py SCENARIO OUTDIR`` with torchrun's variables set (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT; tests/_ranks.py sets them). Every rank saves what the test
checks to ``OUTDIR/SCENARIO_rank{RANK}.pt`` once it has finished: its role, its model's final
parameters, ``stats()``, and for workers the losses and the time of every step. The scenarios
(``SCENARIOS``) differ only in their settings; the test imports ``make_model``, ``batch_rows`` and
the data from here to train its single-process references on the same batch sequence.
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch
from torch import nn

from trainpatterns import FusedAdamW
from trainpatterns.distributed import AsyncDataParallel
from trainpatterns.pendulum import pendulum_data

BATCH = 32
LR = 1e-3
ROWS = 2048  # training rows; with several workers each takes its own contiguous part
KILL_STEP = 20  # the "kill" scenario's worker 1 dies after this many steps
KILL_VERSION = 190  # the "restart1" scenario's server dies while applying this update
SAVE_EVERY = 50

# name -> settings; "world" ranks, "servers" of them serving, the rest training
SCENARIOS = {
    "equiv": dict(world=2, total=60, max_staleness=0),
    "equiv2": dict(world=3, servers=2, total=60, max_staleness=0, compress="bf16"),
    "bounded": dict(world=3, total=300, max_staleness=2, compress="bf16"),
    "free": dict(world=3, total=300),
    "straggler": dict(world=3, total=300, straggler=True),
    "kill": dict(world=3, total=300, timeout=3.0, kill=True),
    "restart1": dict(world=3, total=300, timeout=3.0, checkpoint=True, kill_server=True),
    "restart2": dict(world=3, total=300, timeout=3.0, checkpoint=True),
    "mismatch": dict(world=3, total=300, timeout=5.0, mismatch=True),
    "gather": dict(world=3, total=100, apply_every=3, apply_every_ms=30.0),
}


def make_model(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))


def train_data() -> tuple:
    return pendulum_data(ROWS, seed=0)


def val_data() -> tuple:
    return pendulum_data(512, seed=1)


def worker_part(x: torch.Tensor, y: torch.Tensor, worker: int, workers: int) -> tuple:
    """Worker ``worker``'s own contiguous share of the training rows."""
    n = x.shape[0] // workers
    return x[worker * n:(worker + 1) * n], y[worker * n:(worker + 1) * n]


def batch_rows(generator: torch.Generator, n: int, size: int = BATCH) -> torch.Tensor:
    """The next batch's row indices (the test draws the same sequence from the same seed)."""
    return torch.randint(n, (size,), generator=generator)


def worker_seed(worker: int) -> int:
    return 100 + worker


def _scheduler(kill: bool):
    """A constant LR schedule; with ``kill`` its hook ends the server process at KILL_VERSION."""
    def factor(update: int) -> float:
        if kill and update == KILL_VERSION:
            os._exit(9)
        return 1.0
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _misuse(adp: AsyncDataParallel) -> dict:
    """The calls the wrong role may not make: {call: the error's type and message}."""
    calls = {"stats": lambda: adp.stats()}
    if adp.is_server:
        calls["forward"] = lambda: adp(torch.zeros(1, 2))
        calls["step"] = lambda: adp.step()
    else:
        calls["serve"] = lambda: adp.serve()
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = ("no error", "")
        except Exception as e:  # recorded for the test, which names the expected type
            out[name] = (type(e).__name__, str(e))
    return out


def main(scenario: str, outdir: str) -> None:
    cfg = SCENARIOS[scenario]
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    servers = cfg.get("servers", 1)
    workers = cfg["world"] - servers
    hidden = 33 if cfg.get("mismatch") and rank == cfg["world"] - 1 else 32
    model = make_model(0, hidden)
    checkpoint = os.path.join(outdir, "ckpt") if cfg.get("checkpoint") else None
    adp = AsyncDataParallel(model, optimizer=lambda params: FusedAdamW(params, lr=LR), num_servers=servers,
                            total_updates=cfg["total"], max_staleness=cfg.get("max_staleness"),
                            compress=cfg.get("compress"), timeout=cfg.get("timeout", 30.0),
                            scheduler=_scheduler(cfg.get("kill_server", False)) if checkpoint else None,
                            checkpoint_dir=checkpoint, save_every=SAVE_EVERY if checkpoint else None,
                            apply_every=cfg.get("apply_every", 1), apply_every_ms=cfg.get("apply_every_ms"))
    out = {"server": adp.is_server, "misuse": _misuse(adp),
           "initial": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    if adp.is_server:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adp.serve()
        out["warnings"] = [str(w.message) for w in caught]
    else:
        out.update(_train(adp, cfg, adp.worker, workers))
    adp.finish()
    out["stats"] = adp.stats()
    out["final"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(out, os.path.join(outdir, f"{scenario}_rank{rank}.pt"))


def _train(adp: AsyncDataParallel, cfg: dict, worker: int, workers: int) -> dict:
    x, y = worker_part(*train_data(), worker, workers)
    g = torch.Generator().manual_seed(worker_seed(worker))
    losses, times = [], []
    straggle = cfg.get("straggler") and worker == 1
    while adp.training:
        start = time.perf_counter()
        rows = batch_rows(g, x.shape[0])
        loss = nn.functional.mse_loss(adp(x[rows]), y[rows])
        loss.backward()
        adp.step(rows=len(rows))
        losses.append(loss.item())
        times.append(time.perf_counter())
        if straggle:
            time.sleep(5 * (times[-1] - start))
        if cfg.get("kill") and worker == 1 and len(losses) == KILL_STEP:
            os._exit(17)
    return {"losses": losses, "times": times}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
