"""Benchmark of the fused optimizer steps: trainpatterns.optim against torch.optim.

Why: the fused optimizers exist to be at least as fast as torch's best step on every shape of
parameter list and clearly faster where torch spends time outside the arithmetic. An optimizer
step is bound by memory bandwidth, so next to torch we time a *bandwidth probe*: plain torch memory
ops over flat buffers that read and write the same number of bytes as the step (AdamW fp32: reads
param, grad, m, v and writes param, m, v = 28 B per element). Several probe patterns run and the
fastest one is the reference ("of probe" = probe time / variant time).

All variants of a case live in one process and are timed in turns (interleaved repeats, medians;
see _common.py). Gradients are persistent tensors set once before timing, as torch's own optimizer
benchmarks do; case (b) also times, for torch and for us, a variant that assigns new gradient
tensors before every step (what ``zero_grad(set_to_none=True)`` + backward produce: the default
training loop), outside the timed region, and prints where our step's time goes (per-phase
profile, _optim_profile.py).

Cases:
  a  AdamW on ~50M fp32 parameters shaped like a small GPT (d=768, 6 layers, 100 tensors)
  b  AdamW on 1000 tensors of 1024 elements (per-tensor overhead), persistent and fresh gradients
  c  training-loop step: clip_grad_norm_(1.0) + AdamW(fused=True) vs FusedAdamW(max_grad_norm=1.0)
  d  bf16 parameters with fp32 master weights (ours master_weights=True vs torch fused on fp32
     copies + copies back)
  e  SGD (momentum 0.9) and Adagrad on the shapes of (a)

Run: python bench/bench_optim.py [--quick] [--cases a,b] [--threads N] [--json FILE]
"""
from __future__ import annotations

import gc
import os
import sys
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Result, Target, Variant, apply_threads, common_parser, environment,  # noqa: E402
                     format_table, format_targets, measure, write_json)
from _optim_profile import (FLOOR, format_profile, grad_read_floor, profile, profiled_step,  # noqa: E402
                            without_phases)

import trainpatterns  # noqa: E402,F401
from trainpatterns import _kernels  # noqa: E402
from trainpatterns.optim import FusedAdagrad, FusedAdamW, FusedSGD  # noqa: E402

CASES = "abcde"


# ----- parameter lists ---------------------------------------------------------------------------

def gpt_shapes(d: int = 768, layers: int = 6, vocab: int = 8704, ctx: int = 1024) -> list[tuple]:
    """Parameter shapes of a small GPT: 2 embeddings, per layer 16 tensors (2 layer norms, separate
    q/k/v and output projections with biases, MLP fc/proj with biases), final layer norm: 100
    tensors. With d=768 and vocab 8704 that is 49,999,872 parameters."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]                        # ln_1 weight, bias
        shapes += [(d, d), (d,)] * 3                  # q, k, v weight, bias
        shapes += [(d, d), (d,)]                      # attention output projection
        shapes += [(d,), (d,)]                        # ln_2 weight, bias
        shapes += [(4 * d, d), (4 * d,)]              # MLP fc
        shapes += [(d, 4 * d), (d,)]                  # MLP proj
    shapes += [(d,), (d,)]                            # ln_f weight, bias
    return shapes


def many_small_shapes(n: int = 1000, size: int = 1024) -> list[tuple]:
    return [(size,)] * n


def numel(shapes: list[tuple]) -> int:
    total = 0
    for s in shapes:
        k = 1
        for x in s:
            k *= x
        total += k
    return total


class Maker:
    """Deterministic parameter and gradient lists. Parameters ~N(0, 0.02), gradients ~N(0, 0.01):
    magnitudes that keep every state normal (no denormals) for as many steps as we time."""

    def __init__(self, shapes: list[tuple], seed: int = 0):
        self.shapes = shapes
        gen = torch.Generator().manual_seed(seed)
        self._base_params = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
        self._base_grads = [torch.randn(s, generator=gen) * 0.01 for s in shapes]

    def params(self, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        return [p.to(dtype=dtype, copy=True).requires_grad_(True) for p in self._base_params]

    def grads(self, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        return [g.to(dtype=dtype, copy=True) for g in self._base_grads]


def attach(params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    for p, g in zip(params, grads):
        p.grad = g
    return params


def torch_impls(cls, params_fn: Callable[[], list], grads: list, **kw) -> list[tuple[str, object]]:
    """torch's three implementations of ``cls`` on fresh parameter copies sharing ``grads``."""
    out = []
    for label, impl in (("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True)),
                        ("fused", dict(fused=True))):
        out.append((label, cls(attach(params_fn(), grads), **kw, **impl)))
    return out


# ----- bandwidth probes --------------------------------------------------------------------------

def fp32_probes(n: int, reads: int, writes: int) -> list[Variant]:
    """Plain torch memory ops over flat fp32 buffers of ``n`` elements that read ``reads`` and write
    ``writes`` buffers per element (writes <= reads - 1: the optimizer pattern, where every written
    buffer was read first and one buffer, the gradient, is only read).

    * in-place: ``p.add_(g)`` then ``x.mul_(-1)`` on each other written buffer: every buffer is
      touched once and rewritten where it was read, exactly the optimizer's traffic, in passes.
    * out-of-place: ``torch.add(p, g, out=p2)`` then ``x2.copy_(x)``: the same bytes counted, but
      the destinations are other buffers (a write-allocate costs an extra read on most CPUs).
    Multiplying by -1 keeps values bounded and is not short-circuited by torch."""
    assert writes >= 1 and reads == writes + 1, "pattern: one read-only buffer, the rest read+written"
    nbytes = 4 * (reads + writes) * n
    src = [torch.full((n,), 0.5) for _ in range(reads)]  # src[0] = p, src[1] = g, src[2:] = states
    dst = [torch.empty(n) for _ in range(writes)]
    p, g, states = src[0], src[1], src[2:]

    def inplace():
        p.add_(g)
        for s in states:
            s.mul_(-1.0)

    def out_of_place():
        torch.add(p, g, out=dst[0])
        for s, d in zip(states, dst[1:]):
            d.copy_(s)

    return [Variant("probe: in-place passes", inplace, bytes_per_call=nbytes, role="probe"),
            Variant("probe: out-of-place add+copies", out_of_place, bytes_per_call=nbytes, role="probe")]


def master_probe(n: int) -> Variant:
    """The dtype pattern of an AdamW step with fp32 master weights and bf16 params/grads, 28 B per
    element: reads master (4), grad bf16 (2), m (4), v (4); writes master, m, v (12) and the bf16
    parameter (2). As plain ops: m += grad (mixed dtype), v *= -1, master *= -1, param.fill_."""
    g = torch.full((n,), 0.5, dtype=torch.bfloat16)
    m, v, master = (torch.full((n,), 0.5) for _ in range(3))
    pb = torch.empty(n, dtype=torch.bfloat16)

    def run():
        m.add_(g)
        v.mul_(-1.0)
        master.mul_(-1.0)
        pb.fill_(1.0)

    return Variant("probe: bf16/fp32 mixed passes", run, bytes_per_call=28 * n, role="probe")


def fastest(results: list[Result], role: str) -> Result:
    return min((r for r in results if r.role == role), key=lambda r: r.median)


def alias(results: list[Result], r: Result, name: str) -> None:
    """Insert a copy of ``r`` under a summary name (e.g. "probe (fastest)") right before ``r``."""
    results.insert(results.index(r), Result(name, r.role + "-best", r.samples, r.calls_per_sample,
                                            r.bytes_per_call))


# ----- diagnostics: the native kernel alone ------------------------------------------------------

def kernel_only(opt, name: str, kind: str) -> Optional[Variant]:
    """The native step of ``opt``'s first table called directly (no Python plan checks, no
    hyperparameter struct built per call): ours minus this = our Python overhead per step.
    Relies on private internals; returns None (row left out) if they changed."""
    try:
        plans = [opt._plans[gi] for gi in sorted(opt._plans)]
        tables = [b.table for plan in plans for b in plan.buckets]
        group = opt.param_groups[0]
        control = _kernels.grad_control(1.0)
        threads = torch.get_num_threads()
        if kind == "adam":
            b1, b2 = group["betas"]
            run = _kernels.prepared_adam_step(tables, control, lr=float(group["lr"]), beta1=float(b1),
                                              beta2=float(b2), eps=group["eps"],
                                              weight_decay=group["weight_decay"], decoupled=True, amsgrad=False,
                                              maximize=False, num_threads=threads)
        else:
            raise ValueError(kind)
    except Exception as e:  # noqa: BLE001 - a diagnostic row, never a reason to fail the benchmark
        print(f"  (kernel-only row left out: {type(e).__name__}: {e})")
        return None
    return Variant(name, run, role="info")


# ----- cases -------------------------------------------------------------------------------------

def case_a(cfg: dict) -> dict:
    shapes = gpt_shapes(**cfg["gpt"])
    n = numel(shapes)
    mk = Maker(shapes)
    grads = mk.grads()
    variants = fp32_probes(n, reads=4, writes=3)
    for label, opt in torch_impls(torch.optim.AdamW, mk.params, grads, lr=1e-3):
        variants.append(Variant(f"torch AdamW {label}", opt.step, bytes_per_call=28 * n, role="torch"))
    ours = FusedAdamW(attach(mk.params(), grads), lr=1e-3)
    variants.append(Variant("ours FusedAdamW", ours.step, bytes_per_call=28 * n, role="ours"))
    ours.step()  # builds the pointer table the kernel-only row reuses
    ko = kernel_only(ours, "  ours: native kernel only", "adam")
    if ko is not None:
        ko.bytes_per_call = 28 * n
        variants.append(ko)
    results = measure(variants, **cfg["timing"])
    probe = fastest(results, "probe")
    alias(results, probe, "probe (fastest)")
    by = {r.name: r for r in results}
    value = probe.median / by["ours FusedAdamW"].median
    targets = [Target("(a) ours / probe bandwidth", value, 0.95),
               Target("(a) ours vs torch fused (speedup)", by["torch AdamW fused"].median / by["ours FusedAdamW"].median,
                      1.0, "parity floor")]
    title = (f"(a) AdamW, GPT-like: {n / 1e6:.2f}M fp32 params in {len(shapes)} tensors, 28 B/element, "
             f"fastest probe: {probe.name}")
    return dict(title=title, results=results, targets=targets, baseline="torch AdamW fused", probe="probe (fastest)")


def case_b(cfg: dict) -> dict:
    shapes = many_small_shapes(*cfg["small"])
    n = numel(shapes)
    mk = Maker(shapes, seed=1)
    grads = mk.grads()
    variants = fp32_probes(n, reads=4, writes=3)[:1]
    for label, opt in torch_impls(torch.optim.AdamW, mk.params, grads, lr=1e-3):
        variants.append(Variant(f"torch AdamW {label}", opt.step, bytes_per_call=28 * n, role="torch"))
    ours = FusedAdamW(attach(mk.params(), grads), lr=1e-3)
    variants.append(Variant("ours FusedAdamW", ours.step, bytes_per_call=28 * n, role="ours"))
    ours.step()
    ko = kernel_only(ours, "  ours: native kernel only", "adam")
    if ko is not None:
        ko.bytes_per_call = 28 * n
        variants += [ko, grad_read_floor(ko, ours)]

    # New gradient tensors before every step, as zero_grad(set_to_none=True) + backward give:
    # two pools of gradients, each step takes the one not in place, so both the tensor objects and
    # their storage change.
    pools = [mk.grads(), mk.grads()]

    def fresh(opt) -> Callable[[], None]:
        params = opt.param_groups[0]["params"]

        def setup():
            for p, g in zip(params, pools[params[0].grad is pools[0][0]]):
                p.grad = g
        return setup

    t_fused = torch.optim.AdamW(attach(mk.params(), pools[0]), lr=1e-3, fused=True)
    o_fresh = FusedAdamW(attach(mk.params(), pools[0]), lr=1e-3)
    variants.append(Variant("torch AdamW fused, fresh grads", t_fused.step, setup=fresh(t_fused),
                            bytes_per_call=28 * n, role="torch-fresh"))
    variants.append(Variant("ours FusedAdamW, fresh grads", o_fresh.step, setup=fresh(o_fresh),
                            bytes_per_call=28 * n, role="ours-fresh"))
    # The same two steps once more, with each phase timed inside them (_optim_profile.py).
    clocks = {}
    for kind, grads_of, setup, theirs in (("same grads", grads, None, "torch AdamW fused"),
                                          ("fresh grads", pools[0], fresh, "torch AdamW fused, fresh grads")):
        opt = FusedAdamW(attach(mk.params(), grads_of), lr=1e-3)
        profiled = profiled_step(opt, kind, setup and setup(opt))
        if profiled is not None:
            variants.append(profiled[0])
        clocks[kind] = (profiled and profiled[1], theirs)
    results = measure(variants, **cfg["timing"])
    prof = profile(results, clocks)
    results = without_phases(results)
    by = {r.name: r for r in results}
    ours_r = by["ours FusedAdamW"]
    targets = [
        Target("(b) ours vs torch fused (speedup)", by["torch AdamW fused"].median / ours_r.median, 15.0),
        Target("(b) fresh grads: ours vs torch fused (speedup)",
               by["torch AdamW fused, fresh grads"].median / by["ours FusedAdamW, fresh grads"].median, 10.0),
        Target("(b) ours: Python share of the step (1 - kernel only / ours)",
               1.0 - by["  ours: native kernel only"].median / ours_r.median, None)
        if "  ours: native kernel only" in by else None,
        Target("(b) floor of a checked step: torch fused / (kernel + one read of every .grad)",
               by["torch AdamW fused"].median / by[FLOOR].median, None) if FLOOR in by else None,
    ]
    targets = [t for t in targets if t is not None]
    title = (f"(b) AdamW, {len(shapes)} tensors x {shapes[0][0]} fp32 ({n / 1e6:.2f}M params, "
             f"{28 * n / 1e6:.0f} MB moved: partly cache-resident, so the probe is context only)")
    notes = None if prof is None else format_profile(
        "(b) where our step's time goes: each phase timed inside the steps of a second optimizer, in turns "
        "with the rest", prof)
    return dict(title=title, results=results, targets=targets, baseline="torch AdamW fused",
                probe="probe: in-place passes", notes=notes, profile=prof)


def case_c(cfg: dict) -> dict:
    shapes = gpt_shapes(**cfg["gpt"])
    n = numel(shapes)
    mk = Maker(shapes, seed=2)
    variants = []
    # clip_grad_norm_ rescales the gradients in place, so each torch variant gets its own copy.
    for label, foreach in (("clip(default) + AdamW fused", None), ("clip(foreach) + AdamW fused", True)):
        params = attach(mk.params(), mk.grads())
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)

        def step(params=params, opt=opt, foreach=foreach):
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=foreach)
            opt.step()
        # norm pass reads grads (4 B), scaling reads+writes them (8 B), the step 28 B
        variants.append(Variant(f"torch {label}", step, bytes_per_call=40 * n, role="torch"))
    ours = FusedAdamW(attach(mk.params(), mk.grads()), lr=1e-3, max_grad_norm=1.0)
    # norm pre-pass reads grads (4 B), the update 28 B
    variants.append(Variant("ours FusedAdamW(max_grad_norm=1.0)", ours.step, bytes_per_call=32 * n, role="ours"))
    results = measure(variants, **cfg["timing"])
    best = fastest(results, "torch")
    alias(results, best, "torch (fastest)")
    ours_r = next(r for r in results if r.role == "ours")
    targets = [Target("(c) ours vs fastest torch (speedup)", best.median / ours_r.median, 1.2)]
    title = (f"(c) clip_grad_norm_(1.0) + AdamW step, GPT-like {n / 1e6:.2f}M fp32 params "
             f"(bytes: torch 40 B/elem, ours 32 B/elem)")
    return dict(title=title, results=results, targets=targets, baseline="torch (fastest)", probe=None)


def case_d(cfg: dict) -> dict:
    shapes = gpt_shapes(**cfg["gpt"])
    n = numel(shapes)
    mk = Maker(shapes, seed=3)
    bf16_grads = mk.grads(torch.bfloat16)
    variants = fp32_probes(n, reads=4, writes=3)[:1] + [master_probe(n)]
    # torch: fp32 master copies with fp32 grads; copy bf16 grads in, step, copy params back out.
    for label, impl in (("fused", dict(fused=True)), ("foreach", dict(foreach=True))):
        bf16_params = attach(mk.params(torch.bfloat16), bf16_grads)
        masters = attach([p.detach().float() for p in bf16_params], [torch.empty(s) for s in shapes])
        master_grads = [m.grad for m in masters]
        opt = torch.optim.AdamW(masters, lr=1e-3, **impl)

        @torch.no_grad()
        def step(bf16_params=bf16_params, masters=masters, master_grads=master_grads, opt=opt):
            torch._foreach_copy_(master_grads, [p.grad for p in bf16_params])
            opt.step()
            torch._foreach_copy_(bf16_params, masters)
        # grad copy 2 + 4 B, fp32 step 28 B, param copy 4 + 2 B
        variants.append(Variant(f"torch AdamW {label} on fp32 masters + copies", step,
                                bytes_per_call=40 * n, role="torch"))
    pure = torch.optim.AdamW(attach(mk.params(torch.bfloat16), bf16_grads), lr=1e-3, fused=True)
    variants.append(Variant("  torch AdamW fused, all-bf16 (no master)", pure.step, bytes_per_call=14 * n,
                            role="info"))
    ours = FusedAdamW(attach(mk.params(torch.bfloat16), bf16_grads), lr=1e-3, master_weights=True)
    variants.append(Variant("ours FusedAdamW(master_weights=True)", ours.step, bytes_per_call=28 * n, role="ours"))
    results = measure(variants, **cfg["timing"])
    probe = fastest(results, "probe")
    alias(results, probe, "probe (fastest)")
    best = fastest(results, "torch")
    ours_r = next(r for r in results if r.role == "ours")
    targets = [Target("(d) ours / probe bandwidth", probe.median / ours_r.median, 0.9),
               Target("(d) ours vs fastest torch master recipe (speedup)", best.median / ours_r.median, None)]
    title = (f"(d) AdamW, bf16 params + fp32 master weights, GPT-like {n / 1e6:.2f}M params, "
             f"ours 28 B/elem, fastest probe: {probe.name}")
    return dict(title=title, results=results, targets=targets, baseline=best.name, probe="probe (fastest)")


def case_e(cfg: dict) -> list[dict]:
    shapes = gpt_shapes(**cfg["gpt"])
    n = numel(shapes)
    out = []
    specs = (
        ("SGD momentum=0.9", torch.optim.SGD, FusedSGD, dict(lr=1e-3, momentum=0.9)),
        ("Adagrad", torch.optim.Adagrad, FusedAdagrad, dict(lr=1e-2)),
    )
    for k, (label, tcls, ocls, kw) in enumerate(specs):
        mk = Maker(shapes, seed=4 + k)
        grads = mk.grads()
        # both read param, grad, one state and write param and the state: 20 B per element
        variants = fp32_probes(n, reads=3, writes=2)
        for impl, opt in torch_impls(tcls, mk.params, grads, **kw):
            variants.append(Variant(f"torch {tcls.__name__} {impl}", opt.step, bytes_per_call=20 * n, role="torch"))
        ours = ocls(attach(mk.params(), grads), **kw)
        variants.append(Variant(f"ours {ocls.__name__}", ours.step, bytes_per_call=20 * n, role="ours"))
        results = measure(variants, **cfg["timing"])
        probe = fastest(results, "probe")
        alias(results, probe, "probe (fastest)")
        by = {r.name: r for r in results}
        fused_name = f"torch {tcls.__name__} fused"
        targets = [Target(f"(e) {label}: ours vs torch fused (speedup)",
                          by[fused_name].median / by[f"ours {ocls.__name__}"].median, 1.0),
                   Target(f"(e) {label}: ours / probe bandwidth", probe.median / by[f"ours {ocls.__name__}"].median,
                          None)]
        title = (f"(e) {label}, GPT-like {n / 1e6:.2f}M fp32 params, 20 B/element, fastest probe: {probe.name}")
        out.append(dict(title=title, results=results, targets=targets, baseline=fused_name, probe="probe (fastest)"))
        del variants, results, ours, grads, mk
        gc.collect()
    return out


RUNNERS = {"a": case_a, "b": case_b, "c": case_c, "d": case_d, "e": case_e}


def config(quick: bool) -> dict:
    if quick:
        return dict(gpt=dict(d=384, layers=6), small=(1000, 1024),
                    timing=dict(repeats=5, warmup=2, min_sample_s=0.02))
    return dict(gpt=dict(d=768, layers=6), small=(1000, 1024),
                timing=dict(repeats=9, warmup=3, min_sample_s=0.1))


def main(argv: Optional[list] = None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of a,b,c,d,e")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in RUNNERS]
    if bad or not cases:
        parser.error(f"--cases: unknown case(s) {bad}; choose from {','.join(CASES)}")
    apply_threads(args.threads)
    cfg = config(args.quick)
    env = environment()
    tp = env["trainpatterns"]
    simd = tp.get("simd") if isinstance(tp, dict) else tp
    print(f"bench_optim: torch {env['torch']}, {env['threads']} threads, {env['cpu']}, "
          f"trainpatterns SIMD {simd}, {'quick' if args.quick else 'full'} mode, "
          f"medians of {cfg['timing']['repeats']} interleaved repeats")
    payload = dict(benchmark="bench_optim", environment=env, quick=args.quick, cases={})
    all_targets = []
    for c in cases:
        out = RUNNERS[c](cfg)
        for i, block in enumerate(out if isinstance(out, list) else [out]):
            print()
            print(format_table(block["title"], block["results"], baseline=block["baseline"], probe=block["probe"]))
            if block.get("notes"):
                print()
                print(block["notes"])
            print(format_targets(block["targets"]))
            all_targets += block["targets"]
            key = c if i == 0 else f"{c}{i + 1}"
            payload["cases"][key] = dict(title=block["title"], baseline=block["baseline"], probe=block["probe"],
                                         results=[r.to_dict() for r in block["results"]],
                                         targets=[t.to_dict() for t in block["targets"]],
                                         profile=block.get("profile"))
        del out
        gc.collect()
    print("\nsummary:")
    print(format_targets(all_targets))
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
