"""trainpatterns.distributed: the bucket kernels against plain torch, FusedOptimizer.step_subset
against a full step, and SyncDataParallel on 2 gloo processes (127.0.0.1) against a single process
trained on the concatenated batches (tests/_sync_worker.py runs the ranks and the references).

Every multi-process run has a hard timeout and kills what is left of it; one process pair runs all
training scenarios while two more pairs check failures, all at once (~30-40 s on 2 idle cores).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import trainpatterns as tp
from trainpatterns import _kernels
from trainpatterns.distributed import DistInfo, SyncDataParallel, init_from_env

sys.path.insert(0, str(Path(__file__).parent))
import _sync_worker as W  # noqa: E402
from _ranks import free_port, run_ranks  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _kernels.cuda_compiled() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ----- bucket kernels ---------------------------------------------------------------------------

def _math(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def _slots(numels, gap=5):
    offsets, off = [], 0
    for n in numels:
        offsets.append(off)
        off += n + gap  # gaps between slots must stay untouched
    return offsets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wire", DTYPES)
def test_pack_and_unpack_match_torch(device, dtype, wire):
    torch.manual_seed(0)
    numels = [7, 278011, 0, 1, 33, 4096]
    tensors = [torch.randn(n, dtype=torch.float64).to(dtype).to(device) for n in numels]
    tensors[3] = None  # absent: packs as zeros
    offsets = _slots(numels)
    table = _kernels.make_bucket_table(numels, offsets, dtype, device, tensors)
    bucket = torch.full((table.span + 3,), 7.0, dtype=wire, device=device)
    scale = 1.0 / 3.0
    _kernels.bucket_pack(table, bucket, scale)
    m = _math(dtype, wire)
    touched = torch.zeros(bucket.numel(), dtype=torch.bool)
    for t, o, n in zip(tensors, offsets, numels):
        expect = torch.zeros(n, dtype=wire, device=device) if t is None else (t.to(m) * scale).to(wire)
        torch.testing.assert_close(bucket[o:o + n], expect, rtol=0, atol=0)
        touched[o:o + n] = True
    assert bucket[~touched.to(device)].eq(7).all(), "pack wrote outside the slots"

    outs = [torch.full((n,), -1.0, dtype=dtype, device=device) for n in numels]
    outs[3] = None  # absent: skipped
    back = _kernels.make_bucket_table(numels, offsets, dtype, device, outs)
    _kernels.bucket_unpack(back, bucket, 3.0)
    for out, o, n in zip(outs, offsets, numels):
        if out is not None:
            torch.testing.assert_close(out, (bucket[o:o + n].to(m) * 3.0).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_pack_in_place_when_the_tensor_is_its_own_slot(device):
    flat = torch.randn(100003, device=device)
    before = flat.clone()
    views = [flat[0:50000], flat[50000:100003]]
    table = _kernels.make_bucket_table([50000, 50003], [0, 50000], torch.float32, device, views)
    _kernels.bucket_pack(table, flat, 0.5)
    torch.testing.assert_close(flat, before * 0.5, rtol=0, atol=0)


def test_bucket_kernels_threads_and_empty_table():
    t = torch.randn(300007)
    table = _kernels.make_bucket_table([t.numel()], [0], torch.float32, "cpu", [t])
    b1, b2 = torch.empty(t.numel(), dtype=torch.bfloat16), torch.empty(t.numel(), dtype=torch.bfloat16)
    _kernels.bucket_pack(table, b1, 0.5, num_threads=1)
    _kernels.bucket_pack(table, b2, 0.5, num_threads=2)
    assert torch.equal(b1, b2) and torch.equal(b1, (t * 0.5).bfloat16())
    empty = _kernels.make_bucket_table([], [], torch.float32, "cpu", [])
    _kernels.bucket_pack(empty, torch.empty(0), 0.5)  # nothing to do, no error
    _kernels.bucket_unpack(empty, torch.empty(0), 0.5)


def test_bucket_kernels_reject_bad_input():
    with pytest.raises(ValueError, match="overlaps"):
        _kernels.make_bucket_table([10, 10], [0, 5], torch.float32, "cpu")
    with pytest.raises(TypeError, match="dtype torch.float64 does not match"):
        _kernels.make_bucket_table([4], [0], torch.float32, "cpu", [torch.zeros(4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="5 elements but its bucket slot holds 4"):
        _kernels.make_bucket_table([4], [0], torch.float32, "cpu", [torch.zeros(5)])
    with pytest.raises(ValueError, match="not contiguous"):
        _kernels.make_bucket_table([4], [0], torch.float32, "cpu", [torch.zeros(8)[::2]])
    table = _kernels.make_bucket_table([4], [2], torch.float32, "cpu", [torch.zeros(4)])
    with pytest.raises(ValueError, match="at least 6 elements"):
        _kernels.bucket_pack(table, torch.zeros(5), 1.0)
    with pytest.raises(TypeError, match="not supported"):
        _kernels.bucket_pack(table, torch.zeros(6, dtype=torch.int32), 1.0)


# ----- FusedOptimizer.step_subset ---------------------------------------------------------------

def _params(seed: int):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n)) for n in (7, 278011, 33, 1)]


@pytest.mark.parametrize("opt_cls", [tp.FusedAdamW, tp.FusedSGD])
def test_step_subset_matches_a_full_step(opt_cls):
    full, split = _params(0), _params(0)
    kw = {"lr": 1e-2, "weight_decay": 0.1}
    if opt_cls is tp.FusedSGD:
        kw["momentum"] = 0.9
    a = opt_cls(full, **kw)
    b = opt_cls([{"params": split[:2]}, {"params": split[2:], "lr": 1e-2}], **kw)
    for step in range(4):
        torch.manual_seed(100 + step)
        for p, q in zip(full, split):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        split[3].grad = full[3].grad = None if step == 1 else full[3].grad  # no gradient: skipped
        a.step()
        if step == 2:
            b.step()  # a full step between subset steps keeps the step counts right
        else:
            b.step_subset([split[1], split[2]])
            b.step_subset([split[0], split[3]])
        for p, q in zip(full, split):
            torch.testing.assert_close(q, p, rtol=0, atol=0)
    for p, q in zip(full, split):
        for k, v in a.state[p].items():
            torch.testing.assert_close(b.state[q][k], v, rtol=0, atol=0)


def test_step_subset_rejects_what_it_cannot_do():
    ps = _params(0)
    with pytest.raises(ValueError, match="not parameters of this optimizer"):
        tp.FusedAdamW(ps[:2]).step_subset([ps[2]])
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        tp.FusedAdamW(ps, max_grad_norm=1.0).step_subset(ps[:1])


# ----- SyncDataParallel in one process ----------------------------------------------------------

def test_single_process_is_plain_training(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_from_env()
    assert info == DistInfo(0, 1, 0, torch.device("cpu"), None) and info.is_main
    assert not torch.distributed.is_initialized()
    ref = W.reference("overlap_optim")
    model = W.make_model("irregular")
    opt = tp.FusedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ddp = SyncDataParallel(model, bucket_mb=0.002, optimizer=opt)
    for step in range(W.STEPS):
        opt.zero_grad()
        loss = sum(W.loss_on(ddp, "irregular", step, 0, slice(r * W.BATCH, (r + 1) * W.BATCH), r)
                   for r in range(W.WORLD)) / W.WORLD
        loss.backward()  # steps the optimizer, bucket by bucket
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref["params"][n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("compress", [None, "bf16"])
def test_copied_gradients_give_way_to_their_slots_during_backward(compress):
    # After zero_grad(set_to_none=True) autograd makes fresh gradients; each is copied into its bucket
    # and must be released when that bucket is packed, while backward still runs (so later layers
    # reuse its memory), not at the end of backward. Values: those of a plain copy of the model.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 300), nn.Tanh(), nn.Linear(300, 5))
    plain = copy.deepcopy(model)
    late = model[2].weight
    fresh = {}
    late.register_post_accumulate_grad_hook(lambda p: fresh.update(ref=weakref.ref(p.grad)))  # before ours
    ddp = SyncDataParallel(model, bucket_mb=0.001, first_bucket_mb=0.001, compress=compress)
    assert ddp.bucket_params[0] == ["2.bias", "2.weight"]
    alive_at_end = []
    model[0].weight.register_post_accumulate_grad_hook(lambda p: alive_at_end.append(fresh["ref"]() is not None))
    for step in range(3):
        model.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        x = torch.randn(4, 7)
        ddp(x).square().sum().backward()
        plain(x).square().sum().backward()
        for (n, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0 if compress is None else 2.0 ** -7,
                                       atol=0 if compress is None else 1e-6, msg=f"step {step}: {n}")
    assert alive_at_end == [False, False, False], "a copied-in gradient lived until the end of backward"


class _Checkpointed(nn.Module):
    """Two layers, one of them under activation checkpointing."""

    def __init__(self, where: str, reentrant: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)
        self.where, self.reentrant = where, reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        h = checkpoint(self.a, x, use_reentrant=self.reentrant) if self.where == "a" else self.a(x)
        return checkpoint(self.b, h, use_reentrant=self.reentrant) if self.where == "b" else self.b(h)


@pytest.mark.parametrize("where,reentrant", [("a", False), ("b", False), ("a", True)])
def test_activation_checkpointing_gives_plain_gradients(where, reentrant):
    # Reentrant checkpointing of the first layer runs its backward nested inside the round the
    # last layer opened: the round still ends with the outer backward.
    torch.manual_seed(0)
    model = _Checkpointed(where, reentrant)
    plain = copy.deepcopy(model)
    ddp = SyncDataParallel(model, bucket_mb=1e-5, first_bucket_mb=1e-5)
    x = torch.randn(4, 5, requires_grad=True)
    for _ in range(2):
        ddp.zero_grad()
        plain.zero_grad()
        ddp(x).sum().backward()
        plain(x).sum().backward()
        for (n, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)


def test_a_round_ending_inside_a_nested_backward_is_an_error():
    # Reentrant checkpointing of the last layer: the first gradients come from a nested backward,
    # whose end would close the round (and step an attached optimizer) before the outer backward
    # has produced the rest. That must raise, not average half the gradients.
    model = _Checkpointed("b", reentrant=True)
    ddp = SyncDataParallel(model, bucket_mb=1e-5, first_bucket_mb=1e-5)
    x = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        ddp(x).sum().backward()


def test_bad_arguments_are_clear_errors():
    model = W.make_model("irregular")
    with pytest.raises(ValueError, match="compress must be"):
        SyncDataParallel(model, compress="int8")
    with pytest.raises(ValueError, match="bucket_mb"):
        SyncDataParallel(model, bucket_mb=0)
    with pytest.raises(ValueError, match="p2p_ring must be"):
        SyncDataParallel(model, compress="bf16", p2p_ring="yes")
    with pytest.raises(TypeError, match="fused optimizer"):
        SyncDataParallel(model, optimizer=torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="does not hold parameter 'out.bias'"):
        SyncDataParallel(model, optimizer=tp.FusedAdamW([model.inp.weight]))
    ddp = SyncDataParallel(model)
    model.frozen.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="'frozen.weight' was frozen"):
        ddp(torch.randn(2, 13), False)


# ----- the ring all-reduce on 2 and 3 gloo processes ----------------------------------------------

@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_ring_all_reduce_against_the_exact_sum(world, tmp_path):
    # tests/_ring_worker.py: odd and empty sizes, 16-bit and float32; it asserts that every rank ends
    # with the same bits, within one 16-bit rounding per addition of the float64 sum, and on 2 ranks
    # with the bits of gloo's all-reduce; then that a tensor it cannot take is a clear error.
    worker = Path(__file__).with_name("_ring_worker.py")
    res = run_ranks([str(worker), str(tmp_path)], world=world, timeout_s=120)
    assert [r[0] for r in res] == [0] * world, f"ring workers' return codes and stderr: {[(r[0], r[2]) for r in res]}"
    for r in range(world):
        out = torch.load(tmp_path / f"ring_rank{r}.pt")
        assert out["checked"] == 30 and out["max_rel_err"]["bf16"] > 0  # 10 sizes x 3 dtypes; rounded
        assert "contiguous CPU tensors" in out["bad_input"]


# ----- SyncDataParallel on 2 gloo processes ---------------------------------------------------

def _run_pairs(scenarios: list, tmp: Path, timeout_s: float) -> dict:
    """Start 2 ranks of the worker per scenario, all at once, and wait for rank 0 of each (and for
    rank 1 of "all"); return {scenario: rank 0's return code (None: still running after
    ``timeout_s``)}. Every process left is killed."""
    pkg_root = str(Path(tp.__file__).resolve().parent.parent)
    procs: dict = {}
    t0 = time.monotonic()
    try:
        for scenario in scenarios:
            port = free_port()
            for rank in range(W.WORLD):
                env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(W.WORLD), LOCAL_RANK=str(rank),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                           TP_TEST_GROUP_TIMEOUT="3",
                           PYTHONPATH=os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")]))
                procs[scenario, rank] = subprocess.Popen(
                    [sys.executable, str(Path(W.__file__)), scenario, str(tmp)], env=env)
        codes = {}
        for (scenario, rank), p in procs.items():
            if rank == 1 and scenario != "all":
                continue  # the failing rank: killed below
            try:
                code = p.wait(timeout=max(0.1, timeout_s - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                code = None
            codes[scenario] = code if rank == 0 else (codes[scenario] if code == 0 else code)
        return codes
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All multi-process runs at once: the training scenarios on one pair, the Trainer on another,
    and a pair each where rank 1 dies or stalls mid-backward."""
    tmp = tmp_path_factory.mktemp("sync")
    codes = _run_pairs(["all", "trainer", *W.FAILURES], tmp, timeout_s=150)
    return tmp, codes


@pytest.fixture(scope="module")
def two_ranks(runs):
    tmp, codes = runs
    assert codes["all"] == 0, f"worker return code {codes['all']} (None: killed after the timeout)"
    return [torch.load(tmp / f"all_rank{r}.pt") for r in range(W.WORLD)]


def _check_against_reference(two_ranks, scenario: str, rtol: float, atol: float) -> dict:
    ref = W.reference(scenario)
    r0, r1 = two_ranks[0][scenario], two_ranks[1][scenario]
    for n in ref["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), f"{n} differs between the ranks"
        torch.testing.assert_close(r0["params"][n], ref["params"][n], rtol=rtol, atol=atol, msg=n)
    return ref


@pytest.mark.timeout(180)
@pytest.mark.parametrize("scenario", ["plain", "no_sync", "buckets", "overlap_optim"])
def test_equals_single_process_on_the_concatenated_batch(two_ranks, scenario):
    # float32 summation order is all that differs (the average of two half-batch means vs one mean).
    _check_against_reference(two_ranks, scenario, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("scenario,eps", [("bf16", 2.0 ** -8), ("fp16", 2.0 ** -11)])
def test_compressed_all_reduce_is_close(two_ranks, scenario, eps):
    # SGD(lr) is linear in the gradients: each step moves a parameter by lr * g, and the wire
    # rounds each rank's share and the sum once each (relative eps), so after STEPS steps
    # |p - p_ref| <= 2 * STEPS * lr * max|g| * eps (lr = 0.1).
    ref = W.reference(scenario)
    atol = 2 * W.STEPS * 0.1 * ref["grad_max"] * eps
    ref = _check_against_reference(two_ranks, scenario, rtol=0, atol=atol)
    diff = max((two_ranks[0][scenario]["params"][n] - ref["params"][n]).abs().max().item() for n in ref["params"])
    assert diff > 0, "16-bit wire yet bitwise equal to float32: the compression did not happen"


@pytest.mark.timeout(180)
def test_ring_gives_the_bits_of_gloos_all_reduce_on_two_ranks(two_ranks):
    # compress="bf16" on CPU/gloo sums through our ring; on 2 ranks each element is round(a + b)
    # there as in gloo's all-reduce, so training must end bitwise equal to the dist.all_reduce path.
    for r in range(W.WORLD):
        ring, coll = two_ranks[r]["bf16"], two_ranks[r]["bf16_collective"]
        assert ring["ring"] and not coll["ring"] and not two_ranks[r]["plain"]["ring"]
        for n in coll["params"]:
            assert torch.equal(ring["params"][n], coll["params"][n]), n


@pytest.mark.timeout(180)
def test_unused_and_frozen_parameters(two_ranks):
    ref = W.reference("plain")
    for r in range(W.WORLD):
        res = two_ranks[r]["plain"]
        communicated = {n for b in res["buckets"] for n in b}
        assert not any(n.startswith("frozen.") for n in communicated)
        for n in ("never.weight", "never.bias", "frozen.weight", "frozen.bias"):
            # No rank used them: no gradient (None, as in one process), so AdamW's weight decay did
            # not move them either.
            assert res["grads"][n] is None, n
            torch.testing.assert_close(res["params"][n], ref["init"][n], rtol=0, atol=0)
        # The branch is used by rank 0 only (and by nobody on odd steps): it still trains, and
        # equals the single-process result (checked for every parameter by test_equals_...).
        assert not torch.equal(res["params"]["branch.weight"], ref["init"]["branch.weight"])


@pytest.mark.timeout(180)
def test_bucket_layout_edge_cases(two_ranks):
    buckets = two_ranks[0]["buckets"]["buckets"]
    assert buckets == two_ranks[1]["buckets"]["buckets"], "ranks disagree on the bucket order"
    names = [n for b in buckets for n in b]
    model = W.make_model("tiny")
    expected = [n for n, p in model.named_parameters() if p.requires_grad][::-1]
    assert names == expected, "every trainable parameter once, in reverse registration order"
    assert ["big.weight"] in buckets, "a parameter larger than bucket_mb gets a bucket of its own"
    assert ["scale64"] in buckets, "float64 and float32 parameters never share a bucket"
    tiny_buckets = [b for b in buckets if any(n.startswith("tiny.") for n in b)]
    assert len(tiny_buckets) > 3 and all(len(b) > 1 for b in tiny_buckets[:-1])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how,limit_s", [("die", 15.0), ("stall", 3.0 + 15.0), ("die_bf16", 15.0),
                                         ("stall_bf16", 3.0 + 15.0)])
def test_a_failed_rank_makes_the_other_raise_in_time(runs, how, limit_s):
    # "die": rank 1 exits mid-backward (the connection drops: rank 0 fails at once). "stall": rank 1
    # hangs; rank 0 gives up after its group's 3 s collective timeout. Rank 1 is killed once rank 0
    # is done, or everything at 150 s.
    tmp, codes = runs
    assert codes[how] == 0, f"rank 0 did not finish (return code {codes[how]})"
    res = torch.load(tmp / f"{how}_rank0.pt")
    assert res["error"] is not None, "rank 0 finished training although rank 1 was gone"
    assert "SyncDataParallel: the all-reduce of gradient bucket" in res["error"]
    assert "rank 0 of 2" in res["error"] and "died or stalled" in res["error"]
    assert res["seconds"] < limit_s, f"rank 0 took {res['seconds']:.1f} s to notice"


@pytest.mark.timeout(180)
def test_trainer_under_two_processes_trains_in_step_and_checkpoints(runs):
    # Trainer.fit under torchrun: it wraps the model in SyncDataParallel, shards the data, and
    # saves together with the other rank. Both ranks must end bitwise equal (rank 1 started from
    # other weights), have trained (the loss fell), and the last checkpoint must hold those weights.
    from trainpatterns.checkpoint import CheckpointManager, load_weights

    tmp, codes = runs
    assert codes["trainer"] == 0, f"trainer worker return code {codes['trainer']} (None: killed after the timeout)"
    r0, r1 = (torch.load(tmp / f"trainer_rank{r}.pt") for r in range(W.WORLD))
    assert r0["wrapper"] == r1["wrapper"] == "SyncDataParallel"
    assert r0["steps"] == r1["steps"] == W.TRAINER_STEPS
    assert any(not torch.equal(r0["init"][n], r1["init"][n]) for n in r0["init"]), "ranks started equal"
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), f"{n} differs between the ranks"
        assert not torch.equal(r0["params"][n], r0["init"][n]), f"{n} did not train"
    # train_loss is the mean over both ranks' steps; the validation loss is over the same data with
    # the same weights: both the same on every rank.
    for key in ("train_loss", "val_loss"):
        assert [m[key] for m in r0["history"]] == [m[key] for m in r1["history"]], key
    assert r0["history"][-1]["val_loss"] < r0["history"][0]["val_loss"]
    infos = CheckpointManager(tmp / "trainer_run").list(verify=True)
    assert [i.step for i in infos] == [2, 4, 6] and all(i.valid for i in infos), infos
    restored = W.trainer_model(seed=1)
    load_weights(restored, infos[-1].path)
    for n, p in restored.named_parameters():
        assert torch.equal(p.detach(), r0["params"][n]), f"checkpoint {n} differs from the trained weights"
