"""Microbenchmarks (pytest-benchmark) of every native kernel, each beside its torch or numpy baseline.

Each test times one variant of one kernel; the variants of a kernel share a ``benchmark.group``, so

    pytest bench --benchmark-only --benchmark-group-by=group

prints ours beside the baselines, one table per kernel, and ``--benchmark-json FILE`` /
``--benchmark-save NAME`` + ``--benchmark-compare`` keep runs to compare (docs/benchmarks.md).
Without a timing option (bench/conftest.py) each test runs its variant once, as a smoke test. Either
way every test then asserts that our kernel gives its baseline's result, from fresh inputs and
independently of how often the timed call ran, with the tolerance stated beside it:

* optimizer steps: FusedAdamW / FusedAdam / FusedSGD / FusedAdagrad against torch.optim's for-loop,
  foreach and fused implementations; parameters and every state tensor after 3 steps, fp32
  atol 1e-6 / rtol 1e-5 (the optimizer tests' tolerance);
* gradient norm (the clipping pre-pass): against torch's total norm, rtol 1e-5 (torch sums in
  float32), and against a float64 reference, rtol 1e-12 (ours sums in float64);
* gradient-bucket pack and unpack (scale and cast into / out of the all-reduce buffer, fp32 and
  bf16 wire): against torch.cat + mul + cast and a copy loop, exact (the same roundings);
* the loader's gather (a shuffled epoch of PrefetchLoader): against numpy and torch indexing of the
  same order, exact;
* the optimizers' per-step native helpers: ``data_ptrs`` and ``TensorWatch.refresh`` against Python
  loops over the same tensors, exact;
* checkpoint checksums (CRC-32, ISA-L when installed): against zlib, exact.

The last test checks the two modes themselves: a plain run is a smoke run, ``--benchmark-only``
times (in a subprocess each).

Sizes are small (tens of thousands of elements) so that the smoke run takes seconds; the ratio
scripts next to this file (bench_*.py) measure the real workloads and their targets. CUDA variants
run when a GPU is present (each timed call then ends with a device synchronisation).
"""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from trainpatterns import PrefetchLoader, _kernels  # noqa: E402
from trainpatterns._kernels._native import N_ROWS, ROW_GRAD  # noqa: E402
from trainpatterns.checkpoint._format import checksum  # noqa: E402
from trainpatterns.data import epoch_order  # noqa: E402
from trainpatterns.optim import FusedAdagrad, FusedAdam, FusedAdamW, FusedSGD  # noqa: E402

# Mixed shapes with odd sizes (no multiple of a SIMD width or of a thread's share).
SHAPES = [(257, 129), (129,), (4099,), (61, 67), (1,), (7, 3)]
SHAPES_NAME = f"{len(SHAPES)} fp32 tensors ({sum(math.prod(s) for s in SHAPES):,} elements)"
TINY = [(64,)] * 1000  # the per-tensor overhead case: 1000 tiny tensors
FP32_TOL = dict(atol=1e-6, rtol=1e-5)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and _kernels.cuda_compiled()), reason="needs a GPU and the CUDA kernels"))]


def _timed(fn, device: str):
    """``fn`` as the benchmark calls it: on CUDA the call ends when the device has finished."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _tensors(shapes, seed: int, device: str = "cpu", scale: float = 1.0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(device) for s in shapes]


def _leaves(shapes, device: str) -> list:
    """Parameters ~N(0, 0.02) with fixed gradients ~N(0, 0.01): every state stays normal (no
    denormals) for as many steps as a timing run takes."""
    params = [torch.nn.Parameter(t) for t in _tensors(shapes, 0, device, 0.02)]
    for p, g in zip(params, _tensors(shapes, 1, device, 0.01)):
        p.grad = g
    return params


# ----- optimizer steps -------------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw": (FusedAdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
    "adam": (FusedAdam, torch.optim.Adam, dict(lr=1e-3, weight_decay=0.01)),  # L2 decay, in the gradient
    "sgd": (FusedSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adagrad": (FusedAdagrad, torch.optim.Adagrad, dict(lr=1e-2, lr_decay=1e-3, weight_decay=0.01)),
}
TORCH_IMPLS = {"torch-forloop": dict(foreach=False), "torch-foreach": dict(foreach=True),
               "torch-fused": dict(fused=True)}


def _optimizer(name: str, variant: str, params: list) -> torch.optim.Optimizer:
    ours, theirs, kw = OPTIMIZERS[name]
    return ours(params, **kw) if variant == "ours" else theirs(params, **kw, **TORCH_IMPLS[variant])


def _check_optimizer(name: str, baseline: str, shapes, device: str) -> None:
    """Ours and ``baseline`` from the same start, 3 steps: parameters and states element by element."""
    a, b = _leaves(shapes, device), _leaves(shapes, device)
    ours, ref = _optimizer(name, "ours", a), _optimizer(name, baseline, b)
    for _ in range(3):
        ours.step()
        ref.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), **FP32_TOL)
        for key, value in ref.state[y].items():
            if key != "step":
                torch.testing.assert_close(ours.state[x][key], value, **FP32_TOL)


@pytest.mark.parametrize("variant", ["ours", *TORCH_IMPLS])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_step(benchmark, device, name, variant):
    opt = _optimizer(name, variant, _leaves(SHAPES, device))
    benchmark.group = f"{name} step, {SHAPES_NAME}, {device}"
    benchmark(_timed(opt.step, device))
    _check_optimizer(name, "torch-forloop" if variant == "ours" else variant, SHAPES, device)


@pytest.mark.parametrize("variant", ["ours", "torch-foreach", "torch-fused"])
def test_optimizer_step_many_tiny_tensors(benchmark, variant):
    opt = _optimizer("adamw", variant, _leaves(TINY, "cpu"))
    benchmark.group = "adamw step, 1000 fp32 tensors of 64 elements, cpu"
    benchmark(opt.step)
    _check_optimizer("adamw", "torch-forloop" if variant == "ours" else variant, TINY, "cpu")


# ----- gradient norm -----------------------------------------------------------------------------------

def _torch_total_norm(grads: list) -> torch.Tensor:
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total_norm is not None:
        return total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _our_norm(grads: list, device: str):
    """A callable returning the global L2 norm of ``grads`` through the native sum-of-squares pass."""
    params = [torch.empty_like(g) for g in grads]
    table = _kernels.make_table(params, grads, [], [None] * len(grads), torch.zeros(len(grads), device=device),
                                False)
    if device != "cuda":
        threads = torch.get_num_threads()
        return lambda: math.sqrt(_kernels.grad_sumsq_cpu(table, threads))
    sumsq = torch.zeros((), dtype=torch.float64, device=device)

    def run():
        sumsq.zero_()
        _kernels.grad_sumsq_cuda(table, sumsq)
        return sumsq.sqrt()

    return run


@pytest.mark.parametrize("variant", ["ours", "torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_grad_norm(benchmark, device, variant):
    grads = _tensors(SHAPES, 1, device)
    fn = _our_norm(grads, device) if variant == "ours" else (lambda: _torch_total_norm(grads))
    benchmark.group = f"global gradient norm, {SHAPES_NAME}, {device}"
    out = float(benchmark(_timed(fn, device)))
    exact = float(torch.cat([g.double().reshape(-1) for g in grads]).norm())
    ours, theirs = float(_our_norm(grads, device)()), float(_torch_total_norm(grads))
    assert ours == pytest.approx(exact, rel=1e-12)
    assert theirs == pytest.approx(ours, rel=1e-5)
    assert out == pytest.approx(ours if variant == "ours" else theirs, rel=1e-12)  # CUDA: atomics, any order


# ----- gradient buckets (the all-reduce buffer) ------------------------------------------------------------

WIRES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _bucket(device: str, wire: str):
    grads = _tensors(SHAPES, 2, device)
    numels = [g.numel() for g in grads]
    offsets = np.concatenate([[0], np.cumsum(numels)[:-1]]).tolist()
    return grads, numels, offsets, torch.empty(sum(numels), dtype=WIRES[wire], device=device)


def _torch_pack(grads: list, flat: torch.Tensor, bucket: torch.Tensor, scale: float) -> torch.Tensor:
    torch.cat([g.reshape(-1) for g in grads], out=flat).mul_(scale)
    return flat if bucket is flat else bucket.copy_(flat)


def _torch_unpack(outs: list, numels: list, bucket: torch.Tensor, scale: float) -> list:
    for out, part in zip(outs, bucket.split(numels)):
        out.copy_(part.view_as(out)).mul_(scale)
    return outs


@pytest.mark.parametrize("variant", ["ours", "torch"])
@pytest.mark.parametrize("wire", list(WIRES))
@pytest.mark.parametrize("device", DEVICES)
def test_bucket_pack(benchmark, device, wire, variant):
    grads, numels, offsets, bucket = _bucket(device, wire)
    table = _kernels.make_bucket_table(numels, offsets, torch.float32, device, grads)
    flat = bucket if wire == "fp32" else torch.empty(bucket.numel(), device=device)
    if variant == "ours":
        def fn():
            _kernels.bucket_pack(table, bucket, 0.5)
            return bucket
    else:
        def fn():
            return _torch_pack(grads, flat, bucket, 0.5)
    benchmark.group = f"bucket pack x0.5 into a {wire} wire buffer, {SHAPES_NAME}, {device}"
    out = benchmark(_timed(fn, device)).clone()
    ref = _torch_pack(grads, torch.empty(bucket.numel(), device=device), bucket.clone(), 0.5)
    _kernels.bucket_pack(table, bucket, 0.5)
    assert torch.equal(bucket, ref) and torch.equal(out, ref)


@pytest.mark.parametrize("variant", ["ours", "torch"])
@pytest.mark.parametrize("wire", list(WIRES))
@pytest.mark.parametrize("device", DEVICES)
def test_bucket_unpack(benchmark, device, wire, variant):
    _, numels, offsets, bucket = _bucket(device, wire)
    bucket.copy_(torch.randn(bucket.numel(), generator=torch.Generator().manual_seed(3)))
    outs = [torch.empty(s, device=device) for s in SHAPES]
    table = _kernels.make_bucket_table(numels, offsets, torch.float32, device, outs)
    if variant == "ours":
        def fn():
            _kernels.bucket_unpack(table, bucket, 2.0)
            return outs
    else:
        def fn():
            return _torch_unpack(outs, numels, bucket, 2.0)
    benchmark.group = f"bucket unpack x2 from a {wire} wire buffer, {SHAPES_NAME}, {device}"
    got = [t.clone() for t in benchmark(_timed(fn, device))]
    ref = _torch_unpack([torch.empty(s, device=device) for s in SHAPES], numels, bucket, 2.0)
    mine = [torch.full(s, -1.0, device=device) for s in SHAPES]
    _kernels.bucket_unpack(_kernels.make_bucket_table(numels, offsets, torch.float32, device, mine), bucket, 2.0)
    assert all(torch.equal(a, r) and torch.equal(b, r) for a, b, r in zip(mine, got, ref))


# ----- the loader's gather ---------------------------------------------------------------------------------

ROWS, FEATURES, BATCH = 16384, 64, 512


def _loader_data():
    rng = np.random.default_rng(4)
    return rng.standard_normal((ROWS, FEATURES), dtype=np.float32), rng.integers(0, 10, ROWS)


def _reference_epoch(x, y, epoch: int, variant: str) -> list:
    """One shuffled epoch gathered with numpy or torch indexing, in the loader's order."""
    order = epoch_order(ROWS, 0, epoch, True)
    if variant == "numpy":
        return [(torch.from_numpy(x[i]), torch.from_numpy(y[i])) for i in np.split(order, range(BATCH, ROWS, BATCH))]
    xt, yt, ot = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(order)
    return [(xt.index_select(0, i), yt.index_select(0, i)) for i in ot.split(BATCH)]


@pytest.mark.parametrize("variant", ["ours", "numpy", "torch"])
def test_loader_gather_epoch(benchmark, variant):
    x, y = _loader_data()
    benchmark.group = f"shuffled epoch gather, {ROWS} rows x {FEATURES} fp32 + int64 labels, batch {BATCH}"
    if variant == "ours":
        with PrefetchLoader((x, y), BATCH, shuffle=True, seed=0) as loader:
            # Each call runs one epoch; the loader goes on to the next permutation.
            assert benchmark(lambda: sum(len(b[1]) for b in loader)) == ROWS
    else:
        epochs = itertools.count(1)
        assert benchmark(lambda: sum(len(b[1]) for b in _reference_epoch(x, y, next(epochs), variant))) == ROWS
    with PrefetchLoader((x, y), BATCH, shuffle=True, seed=0) as fresh:
        ours = list(fresh)
    ref = _reference_epoch(x, y, 0, "numpy" if variant == "ours" else variant)
    assert len(ours) == len(ref) == ROWS // BATCH
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(ours, ref))


# ----- the optimizers' per-step native helpers -----------------------------------------------------------------

@pytest.mark.parametrize("variant", ["ours", "python"])
def test_data_ptrs(benchmark, variant):
    tensors = _tensors(TINY, 5)
    fn = (lambda: _kernels.data_ptrs(tensors)) if variant == "ours" else (lambda: [t.data_ptr() for t in tensors])
    benchmark.group = "data addresses of 1000 tensors"
    assert benchmark(fn) == [t.data_ptr() for t in tensors] == _kernels.data_ptrs(tensors)


def _python_watch(params: list):
    """The per-step check done in Python: every parameter's facts (address, size, dtype, layout,
    storage bounds, device) and gradient identity, compared with those recorded."""
    facts = [_kernels.tensor_facts(p) for p in params]
    grads = [p.grad for p in params]

    def check():
        same = all(p.grad is g for p, g in zip(params, grads)) and list(map(_kernels.tensor_facts, params)) == facts
        return _kernels.WATCH_UNCHANGED if same else _kernels.WATCH_CHANGED

    return check


@pytest.mark.parametrize("variant", ["ours", "python"])
def test_tensor_watch_refresh(benchmark, variant):
    params = _leaves(TINY, "cpu")
    grads = [p.grad for p in params]
    rows = torch.zeros(N_ROWS, len(params), dtype=torch.int64)  # one table, as make_table lays it out
    rows[ROW_GRAD] = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    watch = _kernels.tensor_watch(params, list(range(len(params))), grads, [rows])
    fn = (lambda: watch.refresh(params)) if variant == "ours" else _python_watch(params)
    benchmark.group = "per-step check of 1000 parameters and their gradients"
    assert benchmark(fn) == _kernels.WATCH_UNCHANGED
    # New gradient tensors (zero_grad(set_to_none=True) + backward): both see it; ours writes their
    # addresses into the table.
    python = _python_watch(params)
    for p in params:
        p.grad = p.grad.clone()
    assert watch.refresh(params) == _kernels.WATCH_NEW_GRADS and python() == _kernels.WATCH_CHANGED
    assert rows[ROW_GRAD].tolist() == [p.grad.data_ptr() for p in params]


# ----- checkpoint checksums ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["ours", "zlib"])
def test_checkpoint_crc32(benchmark, variant):
    data = np.random.default_rng(6).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    fn = checksum.crc32 if variant == "ours" else zlib.crc32
    benchmark.group = f"CRC-32 of 4 MiB (ours: {checksum.crc32.__module__}.crc32)"
    assert benchmark(fn, data) == zlib.crc32(data) == checksum.crc32(data)


# ----- this file's two modes ------------------------------------------------------------------------------------

def test_timing_runs_only_when_asked(tmp_path):
    # A plain run is a smoke run (each variant once, no tables); --benchmark-only times them, which
    # --benchmark-disable in pytest's options would have made a usage error.
    here = Path(__file__).resolve().parent
    run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here), "-k", "crc32"]
    smoke = subprocess.run(run, cwd=here.parent, capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0 and "2 passed" in smoke.stdout, smoke.stdout + smoke.stderr
    assert "benchmark '" not in smoke.stdout  # no timing table
    out = tmp_path / "run.json"
    timed = subprocess.run(run + ["--benchmark-only", "--benchmark-group-by=group", "--benchmark-min-rounds=3",
                                  "--benchmark-max-time=0.01", f"--benchmark-json={out}"],
                           cwd=here.parent, capture_output=True, text=True, timeout=300)
    assert timed.returncode == 0 and "benchmark 'CRC-32 of 4 MiB" in timed.stdout, timed.stdout + timed.stderr
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert sorted(b["name"] for b in benchmarks) == ["test_checkpoint_crc32[ours]", "test_checkpoint_crc32[zlib]"]
    assert len({b["group"] for b in benchmarks}) == 1 and all(b["stats"]["rounds"] >= 3 for b in benchmarks)
