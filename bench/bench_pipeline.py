"""Benchmark of pipeline parallelism: PipelineParallel's throughput, bubble and activation memory.

Why: a pipeline only pays when its stages stay busy. With S stages and m micro-batches per batch the
ideal schedule idles a fraction (S-1)/(m+S-1) of the time (the bubble), so its best throughput is
S*m/(m+S-1) times the unsplit model's on one rank. 1F1B exists to keep a stage's saved activations
at about S micro-batches instead of GPipe's m.

Setup: an MLP whose blocks dominate the transfer (Linear d x d + GELU blocks, batch B rows; each stage
boundary moves B/m x d floats per micro-batch, each block costs 6*B*d*d flops per batch; d = 1024,
B = 4096, 8 blocks, so a micro-batch at m = 8 keeps a stage busy for about 35 ms), cut into 2
stages balanced by parameter bytes, one thread per rank, gloo. A step is forward, backward and a
FusedAdamW step of the whole batch.

  unsplit      the whole model on rank 0 alone (rank 1 waits at the barrier): the baseline
  pp m=k       PipelineParallel, 1F1B, k micro-batches (k = 1, 2, 4, 8, 16; m = 1 is GPipe's schedule)
  gpipe m=8    the same with GPipe's schedule

Every timed call is `calls` steps after a barrier, the variants in turns (each round starting from a
different one), medians over rounds; times are rank 0's. Throughput ratio = unsplit time / pipeline
time (samples per second, same batch); its fraction of the ideal S*m/(m+S-1) is the target
(>= 0.8 at m = 8). Measured bubble = 1 - (unsplit time / S) / pipeline time: the share of each
stage's time not spent on its half of the work (communication and idling), against the ideal
(S-1)/(m+S-1).

Floor: the ideal assumes a micro-batch costs 1/m of the batch. One thread's matrix products lose
speed on small row counts (measured on a Xeon: 128-row micro-batches cost 20% more than the whole
batch, 256-row ones 5%, 512-row ones 2%), hence B = 4096 (at B = 2048 the floor is 0.88 of the
ideal and the pipeline measured 0.78). "stage0 compute m=8" times stage 0's blocks alone over the
batch in 8 micro-batches, nothing sent: the pipeline cannot beat that stage time times (m+S-1)/m,
and the table prints what fraction of the ideal that floor allows.

Activation memory: one step of each schedule at m = 8 under `saved_tensors_hooks` that count the
bytes autograd keeps for backward (each storage once, parameters excluded) and record the peak on
each rank. Target: 1F1B's peak <= 0.6 x GPipe's (the larger of the ranks' peaks).

Run (2 ranks, gloo):
    torchrun --standalone --nproc-per-node 2 bench/bench_pipeline.py [--quick] [--json FILE]
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Target, common_parser, environment, format_targets, write_json  # noqa: E402

from trainpatterns.distributed import PipelineParallel, init_from_env, shutdown  # noqa: E402
from trainpatterns.optim import FusedAdamW  # noqa: E402

MICROBATCHES = (1, 2, 4, 8, 16)


def make_model(d: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    blocks: list = []
    for _ in range(layers):
        blocks += [nn.Linear(d, d), nn.GELU()]
    return nn.Sequential(*blocks)


class SavedBytes:
    """saved_tensors_hooks that count the bytes autograd keeps for backward: each storage once,
    parameters excluded; ``peak`` is the most alive at once."""

    def __init__(self, params) -> None:
        self.skip = {p.data_ptr() for p in params}
        self.live: dict = {}
        self.now = 0
        self.peak = 0

    def pack(self, t: torch.Tensor):
        if t.data_ptr() in self.skip:
            return t
        key = t.untyped_storage().data_ptr()
        if key in self.live:
            self.live[key][1] += 1
        else:
            n = t.untyped_storage().nbytes()
            self.live[key] = [n, 1]
            self.now += n
            self.peak = max(self.peak, self.now)
        return _Held(t, key, self)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Held) else held


class _Held:
    def __init__(self, t: torch.Tensor, key: int, owner: SavedBytes) -> None:
        self.t, self.key, self.owner = t, key, owner

    def __del__(self) -> None:
        self.owner.release(self.key)


def pipeline_step(pp: PipelineParallel, opt, x, y) -> None:
    opt.zero_grad()
    pp.step(x if pp.is_first else None, y if pp.is_last else None)
    opt.step()


def activation_peak(d: int, layers: int, x, y, schedule: str) -> int:
    pp = PipelineParallel(make_model(d, layers), microbatches=8, schedule=schedule, loss_fn=nn.MSELoss())
    opt = FusedAdamW(pp.parameters(), lr=1e-4)
    pipeline_step(pp, opt, x, y)  # shapes settled outside the count
    counter = SavedBytes(pp.parameters())
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        pipeline_step(pp, opt, x, y)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, counter.peak)
    return max(peaks)


def main() -> None:
    parser = common_parser(__doc__)
    parser.add_argument("--width", type=int, default=None, help="d (default 1024; --quick 512)")
    parser.add_argument("--layers", type=int, default=8, help="Linear+GELU blocks")
    parser.add_argument("--batch", type=int, default=None, help="rows per batch (default 4096; --quick 512)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per rank: the ranks share the cores
    torch.set_flush_denormal(True)
    info = init_from_env("gloo", timeout=600)
    rank, world = info.rank, info.world_size
    if world != 2:
        raise SystemExit("run with torchrun --nproc-per-node 2")
    d = args.width or (512 if args.quick else 1024)
    batch = args.batch or (512 if args.quick else 4096)
    rounds = args.rounds or (3 if args.quick else 7)
    calls = 2
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, d, generator=g), torch.randn(batch, d, generator=g)

    variants: dict = {}
    unsplit = make_model(d, args.layers)
    unsplit_opt = FusedAdamW(unsplit.parameters(), lr=1e-4)

    def unsplit_step() -> None:
        if rank == 0:
            unsplit_opt.zero_grad()
            nn.functional.mse_loss(unsplit(x), y).backward()
            unsplit_opt.step()

    variants["unsplit"] = unsplit_step
    for m in MICROBATCHES:
        # 1F1B needs m >= S; with fewer micro-batches it is GPipe's schedule anyway.
        pp = PipelineParallel(make_model(d, args.layers), microbatches=m, loss_fn=nn.MSELoss(),
                              schedule="1f1b" if m >= world else "gpipe")
        opt = FusedAdamW(pp.parameters(), lr=1e-4)
        variants[f"pp m={m}"] = lambda pp=pp, opt=opt: pipeline_step(pp, opt, x, y)
    pp = PipelineParallel(make_model(d, args.layers), microbatches=8, schedule="gpipe", loss_fn=nn.MSELoss())
    opt = FusedAdamW(pp.parameters(), lr=1e-4)
    variants["gpipe m=8"] = lambda: pipeline_step(pp, opt, x, y)
    # The floor: stage 0's blocks, forward and backward over the batch in 8 micro-batches, nothing sent.
    whole = make_model(d, args.layers)
    stage0 = nn.Sequential(*[whole[int(n)] for n in pp.stage_blocks[0]])
    micro = x[: batch // 8].clone().requires_grad_(True)

    def stage_compute() -> None:
        if rank == 0:
            for _ in range(8):
                out = stage0(micro)
                out.backward(torch.ones_like(out))

    variants["stage0 compute m=8"] = stage_compute

    names = list(variants)
    for name in names:  # warm-up: shapes, buffers, optimizer state
        dist.barrier()
        variants[name]()
    samples: dict = {n: [] for n in names}
    for r in range(rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                variants[name]()
            dist.barrier()
            samples[name].append((time.perf_counter() - start) / calls)
    med = {n: statistics.median(s) for n, s in samples.items()}

    # After the steps: the optimizer's state exists (the GPipe variant's stage is cut as the others').
    stage_bytes = (sum(p.numel() * p.element_size() for p in pp.parameters()),
                   sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                       if isinstance(t, torch.Tensor)))
    peaks = {s: activation_peak(d, args.layers, x, y, s) for s in ("1f1b", "gpipe")}
    memory = [None] * world
    dist.all_gather_object(memory, stage_bytes)
    if rank == 0:
        S = world
        print(f"bench_pipeline: {S} stages on gloo, one thread per rank, MLP {args.layers} x ({d}x{d} Linear + GELU), "
              f"batch {batch}, torch {torch.__version__}")
        print(f"{'variant':<10} {'ms/batch':>9} {'spread':>7} {'vs unsplit':>10} {'ideal':>6} {'of ideal':>8} "
              f"{'bubble':>7} {'ideal bubble':>12}")
        rows = []
        for n in names:
            if n.startswith("stage0"):
                continue
            m = int(n.split("=")[1]) if "=" in n else None
            ratio = med["unsplit"] / med[n]
            ideal = S * m / (m + S - 1) if m else 1.0
            bubble = 1 - (med["unsplit"] / S) / med[n] if m else 0.0
            ideal_bubble = (S - 1) / (m + S - 1) if m else 0.0
            spread = max(samples[n]) / min(samples[n])
            print(f"{n:<10} {med[n] * 1e3:>9.1f} {spread:>7.2f} {ratio:>9.2f}x {ideal:>6.2f} {ratio / ideal:>8.2f} "
                  f"{bubble:>7.2f} {ideal_bubble:>12.2f}")
            rows.append(dict(variant=n, seconds=med[n], samples=samples[n], ratio=ratio, ideal=ideal,
                             bubble=bubble, ideal_bubble=ideal_bubble))
        print(f"activation peak at m=8 (largest rank): 1F1B {peaks['1f1b'] / 2**20:.1f} MiB, "
              f"GPipe {peaks['gpipe'] / 2**20:.1f} MiB, ratio {peaks['1f1b'] / peaks['gpipe']:.2f}")
        whole = sum(p.numel() * p.element_size() for p in unsplit.parameters())
        print("per-rank memory (parameters + FusedAdamW state): "
              + "; ".join(f"rank {r}: {pb / 2**20:.1f} + {ob / 2**20:.1f} MiB ({pb / whole:.2f} of the model)"
                          for r, (pb, ob) in enumerate(memory)))
        at8 = med["unsplit"] / med["pp m=8"] / (S * 8 / (8 + S - 1))
        floor = med["unsplit"] / (med["stage0 compute m=8"] * (8 + S - 1) / 8) / (S * 8 / (8 + S - 1))
        print(f"floor at m=8: stage 0's compute alone over 8 micro-batches {med['stage0 compute m=8'] * 1e3:.1f} ms "
              f"(the unsplit model's half: {med['unsplit'] * 1e3 / S:.1f} ms); with the ideal bubble and no "
              f"communication the pipeline reaches {floor:.2f} of the ideal")
        targets = [Target("pipeline m=8 throughput / (ideal S*m/(m+S-1) x unsplit)", at8, 0.8),
                   Target("GPipe / 1F1B activation peak at m=8 (1F1B <= 0.6x GPipe)",
                          peaks["gpipe"] / peaks["1f1b"], 1 / 0.6)]
        print(format_targets(targets))
        write_json(args.json, {"benchmark": "bench_pipeline", "environment": environment(), "args": vars(args),
                               "rows": rows, "activation_peak": peaks, "memory": memory,
                               "targets": [t.to_dict() for t in targets]})
    shutdown()


if __name__ == "__main__":
    main()
