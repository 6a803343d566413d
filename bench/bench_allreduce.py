"""Benchmark of synchronous data parallelism: SyncDataParallel against torch DDP.

Why: SyncDataParallel must be at least as fast as DDP on the same model and, with a 16-bit wire,
clearly faster where the all-reduce is exposed. Each training step here is zero_grad, forward,
backward, AdamW step, at batch 64 per rank, one thread per rank. All variants live in the same
processes and are timed in turns (interleaved repeats, medians, bench/_common.py); every timed call
is one step, preceded (untimed) by a barrier so the ranks start it together. Times are rank 0's.

Variants (same bucket layout, same optimizer: trainpatterns FusedAdamW, same initial weights):
  ddp             torch DistributedDataParallel(bucket_cap_mb=B)
  ddp_view        the same with gradient_as_bucket_view=True (DDP's zero-copy mode; MLP only)
  ddp_no_sync     DDP's step inside no_sync(): compute only, the floor for any strategy
  ours            SyncDataParallel(bucket_mb=B, first_bucket_mb=F), F the first-bucket cap DDP uses,
                  read from it (torch 2.13: B itself when bucket_cap_mb is given, as here; 1 MiB
                  with DDP's default cap), so both split the gradients into the same buckets
  ours_no_sync    ours inside no_sync(): our compute-only step (shares ours' model)
  ours_bf16       ours with compress="bf16" (on CPU/gloo summed by our ring, distributed/ring.py)
  ours_bf16_gloo  the same with p2p_ring=False: gloo's own bfloat16 all-reduce (CPU only)
  ours_step_overlap  ours with optimizer=...: each bucket stepped once reduced (MLP only)
  allreduce       a plain dist.all_reduce of a float32 buffer as large as all gradients: the link's
                  limit for the uncompressed bytes (allreduce_bf16: the same count in bfloat16;
                  ring_bf16: that buffer through our ring)
  pack_unpack_bf16  the bucket kernels' two casts over that many elements (pack to bf16, unpack back)
Scaling efficiency = compute-only step / step.

Floor of "ours bf16 / DDP" on CPU: (ours compute-only step + pack_unpack_bf16 + the CPU time, all
threads of the process, of one ring_bf16) / DDP step. That is the best any bf16 strategy over this
link can do, as long as the ranks' compute already keeps every core busy (here 2 ranks, one thread
each, on 2 cores): the communication's CPU work then cannot hide behind compute, only add to it.

Denormals: on CPU the benchmark flushes denormal floats to zero (``torch.set_flush_denormal``; off with
--keep-denormals). On random tokens many gradients are tiny, their squares in AdamW's second moment
and the updates they make go denormal after a few dozen steps, and denormal arithmetic is many times
slower on Intel cores: on the GPT, a model copy's step time then grows with the number of steps it
has taken (ours and DDP also take their no_sync steps on the same model, so they take twice as many
as ours_bf16's copy), which measured 2.5 s against 0.9 s for the same step with flushing, and made
ours_bf16 look 1.7-1.9x faster than DDP. Flushing applies to every variant alike.

Models: a 4-layer 1024-wide MLP, and (not with --quick) a ~50M-parameter GPT (d=768, 6 layers,
vocab 8704, ctx 1024, tied head; --seq tokens per sample). A last table times the bucket kernels alone (pack with scale, float32 and bf16 wire) over
the GPT's gradient shapes against a plain copy of the same bytes (the device's copy bandwidth).

Run (2 ranks on this machine, gloo):
    torchrun --standalone --nproc-per-node 2 bench/bench_allreduce.py [--quick] [--json FILE]
On a GPU (NCCL, world size 1: correctness and bucket-kernel bandwidth):
    torchrun --standalone --nproc-per-node 1 bench/bench_allreduce.py --device cuda
"""
from __future__ import annotations

import copy
import functools
import os
import resource
import statistics
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Target, Variant, common_parser, environment, format_table, format_targets,  # noqa: E402
                     measure, write_json)

import trainpatterns as tp  # noqa: E402
from trainpatterns import _kernels  # noqa: E402
from trainpatterns.distributed import SyncDataParallel, init_from_env, shutdown  # noqa: E402
from trainpatterns.distributed.ring import ring_for  # noqa: E402


# ----- models ---------------------------------------------------------------------------------

def mlp(width: int = 1024, layers: int = 4) -> nn.Module:
    mods = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.fc, self.fc_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = d // 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln_1(x)
        q, k, v = (m(h).view(b, t, self.heads, 64).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """The GPT shape of bench_optim: 100 tensors, 49,999,872 parameters (the head is tied)."""

    def __init__(self, d: int = 768, layers: int = 6, vocab: int = 8704, ctx: int = 1024) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.t()


# ----- one training step per variant -------------------------------------------------------------

class Trainer:
    """A model copy, its optimizer and the step of one variant."""

    def __init__(self, name, wrapped, opt, loss_fn, batch, overlap=False, no_sync=False):
        self.name, self.wrapped, self.opt = name, wrapped, opt
        self.loss_fn, self.batch, self.overlap, self.no_sync = loss_fn, batch, overlap, no_sync

    def step(self) -> None:
        self.opt.zero_grad()
        if self.no_sync:
            with self.wrapped.no_sync():
                self.loss_fn(self.wrapped, self.batch).backward()
        else:
            self.loss_fn(self.wrapped, self.batch).backward()
        if not self.overlap:
            self.opt.step()


def make_trainers(base: nn.Module, loss_fn, batch, bucket_mb: float, device, full: bool) -> dict:
    """The variants' trainers by name; without ``full`` only ddp, ddp_no_sync, ours and ours_bf16
    (four model copies fewer: the GPT case would otherwise need ~10 GB over both ranks)."""
    def fresh():
        return copy.deepcopy(base).to(device)

    def opt(m):
        return tp.FusedAdamW(m.parameters(), lr=1e-4, weight_decay=0.1)

    dev_ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(fresh(), device_ids=dev_ids, bucket_cap_mb=bucket_mb)
    ddp_opt = opt(ddp)
    sdp = functools.partial(SyncDataParallel, bucket_mb=bucket_mb, first_bucket_mb=ddp_first_bucket_mb(ddp))
    ours_model, bf16_model = fresh(), fresh()
    ours, ours_opt = sdp(ours_model), opt(ours_model)
    bf16_gloo_model = fresh() if device.type == "cpu" else None
    trainers = {
        "ddp": Trainer("ddp", ddp, ddp_opt, loss_fn, batch),
        "ddp_no_sync": Trainer("ddp_no_sync", ddp, ddp_opt, loss_fn, batch, no_sync=True),
        "ours": Trainer("ours", ours, ours_opt, loss_fn, batch),
        "ours_no_sync": Trainer("ours_no_sync", ours, ours_opt, loss_fn, batch, no_sync=True),
        "ours_bf16": Trainer("ours_bf16", sdp(bf16_model, compress="bf16"), opt(bf16_model), loss_fn, batch),
    }
    if bf16_gloo_model is not None:
        trainers["ours_bf16_gloo"] = Trainer("ours_bf16_gloo", sdp(bf16_gloo_model, compress="bf16", p2p_ring=False),
                                             opt(bf16_gloo_model), loss_fn, batch)
    if full:
        ddp_view = nn.parallel.DistributedDataParallel(fresh(), device_ids=dev_ids, bucket_cap_mb=bucket_mb,
                                                       gradient_as_bucket_view=True)
        trainers["ddp_view"] = Trainer("ddp_view", ddp_view, opt(ddp_view), loss_fn, batch)
        overlap_model = fresh()
        overlap_opt = opt(overlap_model)
        trainers["ours_step_overlap"] = Trainer(
            "ours_step_overlap", sdp(overlap_model, optimizer=overlap_opt), overlap_opt, loss_fn, batch, overlap=True)
    return trainers


def ddp_first_bucket_mb(ddp: nn.parallel.DistributedDataParallel) -> float:
    """The cap (MiB) DDP gives its first bucket. In torch 2.13 an explicit ``bucket_cap_mb`` applies to
    the first bucket too (1 MiB only with the default cap); releases without that config use
    1 MiB. Ours gets the same, so both split the gradients alike (a 1 MiB first bucket shifts
    every later boundary: on the GPT our last, fully exposed bucket would grow from 30 to 49 MB)."""
    config = getattr(ddp, "_bucket_config", None)
    return getattr(config, "first_bucket_bytes_cap", dist._DEFAULT_FIRST_BUCKET_BYTES) / 2 ** 20


def check_same_result(trainers: dict) -> float:
    """Max |difference| between the parameters of ours and uncompressed DDP after all steps. With
    ``full``: DDP(gradient_as_bucket_view) against ours(optimizer=), which took the same steps and no
    others (expected 0). Else plain DDP against ours: both also took their no_sync steps (as many,
    in another order, each rank on its own gradients), so only a rough figure."""
    full = "ddp_view" in trainers
    a = dict(trainers["ddp_view" if full else "ddp"].wrapped.module.named_parameters())
    b = dict(trainers["ours_step_overlap" if full else "ours"].wrapped.module.named_parameters())
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _timed(fn, device: torch.device):
    """``fn`` followed by a device synchronisation on CUDA, so a timed call includes its kernels."""
    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return call


def _cpu_seconds(fn, into: list):
    """``fn`` that also appends the CPU time (user + system, every thread of the process) it took."""
    def call():
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        into.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return call


def run_case(title: str, base: nn.Module, loss_fn, batch, args, device, rank, world, full: bool = True) -> dict:
    trainers = make_trainers(base, loss_fn, batch, args.bucket_mb, device, full)
    numel = sum(p.numel() for p in base.parameters())
    flat32 = torch.zeros(numel, device=device)
    flat16 = torch.zeros(numel, dtype=torch.bfloat16, device=device)
    timed = functools.partial(_timed, device=device)
    whole = _kernels.make_bucket_table([numel], [0], torch.float32, device, [flat32])
    ring_cpu: list = []

    barrier = (lambda: dist.barrier()) if world > 1 else None
    variants = [Variant(t.name, timed(t.step), setup=barrier) for t in trainers.values()]
    variants += [Variant("allreduce", timed(lambda: dist.all_reduce(flat32)), setup=barrier,
                         bytes_per_call=numel * 4.0),
                 Variant("allreduce_bf16", timed(lambda: dist.all_reduce(flat16)), setup=barrier,
                         bytes_per_call=numel * 2.0),
                 Variant("pack_unpack_bf16", timed(lambda: (_kernels.bucket_pack(whole, flat16, 0.5),
                                                            _kernels.bucket_unpack(whole, flat16, 1.0))),
                         bytes_per_call=numel * 12.0)]
    if device.type == "cpu" and world > 1:
        ring = ring_for(None)
        variants.append(Variant("ring_bf16", _cpu_seconds(lambda: ring.submit(flat16).wait(), ring_cpu),
                                setup=barrier, bytes_per_call=numel * 2.0))
    # One call per sample on every rank (no per-rank calibration): the ranks stay in lockstep.
    results = measure(variants, repeats=args.repeats, warmup=2, min_sample_s=0.0, max_calls=1)
    drift = check_same_result(trainers)
    by = {r.name: r.median for r in results}
    compute = by["ddp_no_sync"]
    targets = [
        Target(f"{title}: DDP step / ours step", by["ddp"] / by["ours"], 1.0, "ours <= 1.0x DDP"),
        Target(f"{title}: DDP step / ours bf16 step", by["ddp"] / by["ours_bf16"], 1 / 0.85,
               "ours bf16 <= 0.85x DDP uncompressed"),
    ]
    if full:
        targets += [
            Target(f"{title}: DDP(gradient_as_bucket_view) step / ours step", by["ddp_view"] / by["ours"], None),
            Target(f"{title}: DDP step / ours step_overlap step", by["ddp"] / by["ours_step_overlap"], None),
        ]
    for name in trainers:
        if not name.endswith("_no_sync"):
            targets.append(Target(f"{title}: scaling efficiency {name} (compute-only / step)", compute / by[name],
                                  None))
    if "ours_bf16_gloo" in by:
        targets.append(Target(f"{title}: ours bf16 with gloo's all-reduce / ours bf16 (ring) step",
                              by["ours_bf16_gloo"] / by["ours_bf16"], None))
    # Any step, compressed or not, costs at least its compute: when this exceeds 0.85 the bf16 target
    # is out of reach on this machine, whatever the wire.
    targets += [
        Target(f"{title}: ours compute-only / DDP compute-only", by["ours_no_sync"] / compute, None),
        Target(f"{title}: ours compute-only / DDP step (floor of 'ours bf16 / DDP')", by["ours_no_sync"] / by["ddp"],
               None),
    ]
    if ring_cpu:
        ring_s = statistics.median(ring_cpu[-args.repeats:])
        floor = (by["ours_no_sync"] + by["pack_unpack_bf16"] + ring_s) / by["ddp"]
        targets += [
            Target(f"{title}: CPU time of ring_bf16, all threads (ms)", ring_s * 1e3, None),
            Target(f"{title}: floor of 'ours bf16 / DDP' with the wire's CPU time (see docstring)", floor, None),
        ]
    targets += [
        Target(f"{title}: max |ours - DDP| parameter difference after all steps", drift, None,
               "DDP(view) vs ours(optimizer=), same steps" if full else "both also took their no_sync steps"),
    ]
    if rank == 0:
        first_mb = trainers["ours"].wrapped.first_bucket_mb
        print(format_table(f"\n{title}: {numel / 1e6:.1f}M parameters, {world} ranks, bucket {args.bucket_mb} MiB "
                           f"(first {first_mb:g} MiB, as DDP), batch {args.batch}/rank", results, baseline="ddp"))
        print(format_targets(targets))
    del trainers
    return {"title": title, "numel": numel, "results": [r.to_dict() for r in results],
            "targets": [t.to_dict() for t in targets]}


def kernel_case(device, repeats: int, rank: int) -> dict:
    """The bucket kernels alone over the GPT's gradient shapes, vs a plain copy of the same bytes."""
    from bench_optim import gpt_shapes

    grads = [torch.randn(s, device=device) for s in gpt_shapes()]
    numels = [g.numel() for g in grads]
    offsets, off = [], 0
    for n in numels:
        offsets.append(off)
        off = (off + n + 15) // 16 * 16
    table = _kernels.make_bucket_table(numels, offsets, torch.float32, device, grads)
    b32 = torch.empty(off, device=device)
    b16 = torch.empty(off, dtype=torch.bfloat16, device=device)
    src, dst = torch.cat([g.reshape(-1) for g in grads]), torch.empty(sum(numels), device=device)
    views = [b32[o:o + n] for o, n in zip(offsets, numels)]
    n = float(sum(numels))
    timed = functools.partial(_timed, device=device)

    variants = [
        Variant("copy (probe)", timed(lambda: dst.copy_(src)), bytes_per_call=8 * n, role="probe"),
        Variant("per-tensor copy_ into bucket", timed(lambda: [v.copy_(g.reshape(-1)) for v, g in zip(views, grads)]),
                bytes_per_call=8 * n),
        Variant("pack fp32 x1/2", timed(lambda: _kernels.bucket_pack(table, b32, 0.5)), bytes_per_call=8 * n),
        Variant("pack bf16 x1/2", timed(lambda: _kernels.bucket_pack(table, b16, 0.5)), bytes_per_call=6 * n),
    ]
    results = measure(variants, repeats=repeats, warmup=2)
    by = {r.name: r for r in results}
    targets = [Target(f"bucket kernels on {device.type}: pack fp32 bandwidth / copy bandwidth",
                      by["pack fp32 x1/2"].gbps / by["copy (probe)"].gbps,
                      0.8 if device.type == "cuda" else None, "GPU target >= 0.8 of a device copy")]
    if rank == 0:
        print(format_table(f"\nbucket kernels alone, {n / 1e6:.1f}M fp32 gradients in 100 tensors, on {device}",
                           results, probe="copy (probe)"))
        print(format_targets(targets))
    return {"results": [r.to_dict() for r in results], "targets": [t.to_dict() for t in targets]}


def main() -> None:
    parser = common_parser(__doc__)
    parser.set_defaults(threads=1)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--batch", type=int, default=64, help="samples per rank")
    parser.add_argument("--seq", type=int, default=4, help="GPT tokens per sample")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormal floats to zero on CPU (see the module docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # one thread per rank: the ranks share the cores
    flushed = args.device == "cpu" and not args.keep_denormals and torch.set_flush_denormal(True)
    info = init_from_env("nccl" if args.device == "cuda" else "gloo", timeout=300)
    if info.backend is None:  # a single process: NCCL/gloo world of one, for the GPU correctness check
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    gpt_repeats = args.repeats or 7
    args.repeats = args.repeats or (7 if args.quick else 15)
    if rank == 0:
        print(f"bench_allreduce: {world} ranks, {dist.get_backend()}, {args.threads} thread(s) per rank, "
              f"torch {torch.__version__}, trainpatterns SIMD {tp.build_info()['simd']}, "
              f"denormals {'flushed to zero' if flushed else 'kept'}")

    torch.manual_seed(0)
    cases = []
    x = torch.randn(args.batch, 1024, device=device)
    y = torch.randn(args.batch, 1024, device=device)
    cases.append(run_case("MLP 4x1024", mlp(), lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y), args, device,
                          rank, world))
    if not args.quick:
        torch.manual_seed(0)
        idx = torch.randint(0, 8704, (args.batch, args.seq + 1), device=device)
        gpt_loss = lambda m, b: F.cross_entropy(m(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())  # noqa: E731
        args.repeats = gpt_repeats
        cases.append(run_case(f"GPT ~50M (seq {args.seq})", GPT(), gpt_loss, idx, args, device, rank, world,
                              full=False))
    kernels = kernel_case(device, 5 if args.quick else 9, rank)
    if rank == 0:
        write_json(args.json, {"benchmark": "bench_allreduce", "environment": environment(), "world": world,
                               "backend": dist.get_backend(), "args": vars(args), "cases": cases,
                               "kernels": kernels})
    shutdown()


if __name__ == "__main__":
    main()
