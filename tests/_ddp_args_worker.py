"""Worker of tests/test_sync_ddp_args.py: one rank trains one model under torch's
DistributedDataParallel and a copy under SyncDataParallel, both given the same DDP keyword
arguments, and saves every step's gradients, the parameters and the buffers of both; then both
bucket layouts for one cap.

Run as ``python tests/_ddp_args_worker.py OUTDIR`` with torchrun's variables set; writes
``OUTDIR/rank{RANK}.pt`` = {scenario: {"ddp": run, "ours": run}, "layout": {"ddp": sizes, "ours": sizes}}.
"""
from __future__ import annotations

import copy
import inspect
import os
import sys
import warnings

import torch
from torch import nn

STEPS = 4
BATCH = 6  # rows per rank

# Scenario -> the keyword arguments both wrappers get.
SCENARIOS = {
    # the switch the issue asks for: DDP's names, unused parameters, rank-local buffers
    "ddp_kwargs": dict(bucket_cap_mb=0.001, find_unused_parameters=True, gradient_as_bucket_view=True,
                       broadcast_buffers=False),
    # nothing broadcast at wrap time: each rank keeps its own initial weights, as DDP does
    "no_init_sync": dict(init_sync=False, find_unused_parameters=True),
    # DDP's newer buffer argument: buffers synced at wrap time, not before each forward
    "forward_sync_buffers": dict(forward_sync_buffers=False, find_unused_parameters=True, bucket_cap_mb=0.002),
}


class Net(nn.Module):
    """A branch only rank 0 uses (on even steps), a layer nobody uses, a buffer the forward reads
    and one it changes."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(13, 37)
        self.branch = nn.Linear(37, 37)
        self.never = nn.Linear(37, 3)
        self.out = nn.Linear(37, 5)
        self.register_buffer("shift", torch.randn(37))
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        self.seen += x.shape[0]
        h = torch.tanh(self.inp(x)) + self.shift
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.out(h)


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 + step)
    x, t = torch.randn(2 * BATCH, 13, generator=g), torch.randn(2 * BATCH, 5, generator=g)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    return x[rows], t[rows]


def train(wrapped: nn.Module, model: nn.Module, rank: int) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grads = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        x, t = batch(step, rank)
        ((wrapped(x, rank == 0 and step % 2 == 0) - t) ** 2).mean().backward()
        grads.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}}


def run(kwargs: dict, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from trainpatterns.distributed import SyncDataParallel

    torch.manual_seed(rank)  # the ranks start from other weights and other buffers
    model = Net()
    theirs, ours = model, copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.13 deprecates broadcast_buffers for its new name
        ddp = DistributedDataParallel(theirs, **kwargs)
    sdp = SyncDataParallel(ours, **kwargs)
    return {"ddp": train(ddp, theirs, rank), "ours": train(sdp, ours, rank)}


def layout(rank: int) -> dict:
    """DDP's bucket sizes once it has rebuilt its buckets in the order gradients arrive (all
    parameters used), beside ours, for a cap above DDP's 1 MiB default first bucket."""
    from torch.nn.parallel import DistributedDataParallel

    from trainpatterns.distributed import SyncDataParallel

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(3)], nn.Linear(512, 10))
    ours = copy.deepcopy(model)
    ddp = DistributedDataParallel(model, bucket_cap_mb=3)
    sdp = SyncDataParallel(ours, bucket_cap_mb=3)
    for _ in range(3):  # DDP rebuilds its buckets at the forward after the first backward
        ddp(torch.randn(2, 512)).sum().backward()
    rebuilt = ddp._get_ddp_logging_data().get("rebuilt_bucket_sizes", "")
    return {"ddp": [int(s) for s in str(rebuilt).split(",") if s.strip()],
            "ours": [sum(p.numel() * p.element_size() for n, p in ours.named_parameters() if n in names)
                     for names in sdp.bucket_params]}


def main() -> None:
    outdir = sys.argv[1]
    torch.set_num_threads(1)
    from trainpatterns.distributed import init_from_env
    from torch.nn.parallel import DistributedDataParallel

    info = init_from_env(timeout=60.0)
    known = set(inspect.signature(DistributedDataParallel.__init__).parameters)
    out = {name: run(kw, info.rank) for name, kw in SCENARIOS.items() if set(kw) <= known}
    out["layout"] = layout(info.rank)
    torch.save(out, os.path.join(outdir, f"rank{info.rank}.pt"))
    sys.stdout.flush()
    os._exit(0)  # a gloo group's teardown can block; nothing is left to do


if __name__ == "__main__":
    main()
