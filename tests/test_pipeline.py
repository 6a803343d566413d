"""PipelineParallel against the unsplit model: 2 and 3 stages, GPipe and 1F1B, on gloo. One batch's
loss and every gradient equal the unsplit model's (fp32, 1e-6), 20 steps with global-norm clipping
track the unsplit run, and export_full_model loads into the plain model. Rank script:
tests/_pipeline_worker.py."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _pipeline_worker as W  # noqa: E402
from _ranks import run_ranks  # noqa: E402

from trainpatterns.checkpoint import load_weights  # noqa: E402
from trainpatterns.optim import FusedAdamW  # noqa: E402

WORKER = str(Path(__file__).with_name("_pipeline_worker.py"))


def rank_lines(out: str, rank: int) -> list:
    """The lines a rank of the worker printed about itself ("rank <r>: ...")."""
    return [line for line in out.splitlines() if line.startswith(f"rank {rank}: ")]


def reference():
    """The unsplit model: batch 0's loss and gradients, then the same 20 steps with clipping."""
    model = W.make_model()
    x, y = W.batch(0)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(1, W.STEPS + 1):
        opt.zero_grad()
        x, y = W.batch(step)
        out = nn.functional.mse_loss(model(x), y)
        out.backward()
        losses.append(float(out.detach()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return float(loss.detach()), grads, losses, model


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world,mode,microbatches", [(2, "1f1b", 4), (2, "gpipe", 4), (3, "1f1b", 4),
                                                     (3, "gpipe", 3), (2, "interleaved", 4), (2, "time", 4),
                                                     (4, "dp", 2)])
def test_stages_equal_the_unsplit_model(tmp_path, world, mode, microbatches):
    # "dp": 2 replicas of a 2-stage pipeline (ranks 0-1 and 2-3), each on half of the batch.
    res = run_ranks([WORKER, str(tmp_path), mode, str(microbatches)], world=world, timeout_s=150)
    assert [r[0] for r in res] == [0] * world, res
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    loss, grads, losses, model = reference()
    width = 2 if mode == "dp" else world
    last = [r for r in range(world) if r % width == width - 1]
    assert all(ranks[r]["loss"] is None for r in range(world) if r not in last)
    for r in last:
        assert ranks[r]["loss"] == pytest.approx(loss, rel=1e-6)
    seen = {}
    for r in ranks:
        for n, g in r["grads"].items():
            if n in seen:  # a replica of the same stage: the same averaged gradient
                torch.testing.assert_close(g, seen[n], rtol=0, atol=0)
        seen.update(r["grads"])
    assert sorted(seen) == sorted(grads)  # every parameter once, under the unsplit model's names
    for n, g in grads.items():
        torch.testing.assert_close(seen[n], g, rtol=1e-5, atol=1e-6)
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(ranks[-1]["losses"], losses))
    if mode == "interleaved":  # 4 stages looped over 2 ranks: rank 0 holds stages 0 and 2
        assert [r["stage_ids"] for r in ranks] == [[0, 2], [1, 3]] and len(ranks[0]["blocks"]) == 4
    if mode == "time":  # the ranks measured, averaged and cut alike; the costs are seconds
        assert ranks[0]["blocks"] == ranks[1]["blocks"] and ranks[0]["costs"] == ranks[1]["costs"]
        assert all(0 < c < 1 for c in ranks[0]["costs"])
    plain = W.make_model()
    load_weights(plain, tmp_path / "full.safetensors")
    for n, p in model.named_parameters():
        torch.testing.assert_close(dict(plain.named_parameters())[n], p, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(120)
def test_a_batch_that_does_not_split_is_an_error_on_every_stage(tmp_path):
    res = run_ranks([WORKER, str(tmp_path), "1f1b", "5"], world=3, timeout_s=90)  # 24 rows, 5 micro-batches
    assert [r[0] for r in res] == [0, 0, 0], res
    assert "does not split into 5 micro-batches" in res[0][1] and "does not split" in res[2][1]
    assert "rank 1: ValueError: another stage refused the batch" in res[1][1]


def test_bad_arguments_are_clear_errors():
    import torch.distributed as dist

    from trainpatterns.distributed.pipeline import PipelineParallel

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_from_env"):
        PipelineParallel(W.make_model(), loss_fn=nn.MSELoss())


@pytest.mark.parametrize("sizes,stages", [([1, 1, 1, 1], 2), ([8, 1, 1, 1, 1, 1, 1, 1], 2), ([1, 1, 9, 1, 1], 3),
                                          ([5, 5, 5], 3), ([1] * 7, 7)])
def test_balance_by_bytes_is_the_best_contiguous_cut(sizes, stages):
    from itertools import combinations

    from trainpatterns.distributed._pipeline_split import balanced_starts as _balanced_starts

    starts = _balanced_starts([float(s) for s in sizes], stages)
    assert len(starts) == stages and starts[0] == 0 and starts == sorted(set(starts))

    def worst(st):
        bounds = list(st) + [len(sizes)]
        return max(sum(sizes[bounds[k]:bounds[k + 1]]) for k in range(len(st)))

    best = min(worst((0, *c)) for c in combinations(range(1, len(sizes)), stages - 1))
    assert worst(starts) == best  # brute force over every contiguous cut


@pytest.mark.timeout(120)
def test_bad_splits_are_the_same_clear_error_on_every_rank(tmp_path):
    res = run_ranks([WORKER, str(tmp_path), "errors", "4"], world=2, timeout_s=90)
    assert [r[0] for r in res] == [0, 0], res
    for rank, (_, out, _) in enumerate(res):
        lines = rank_lines(out, rank)
        assert len(lines) == 10, out
        for want in ("split point(s) ['9'] are not top-level blocks", "split_points must name 1 block(s)",
                     "microbatches must be an int >= 1", "schedule must be one of", "stages=5 but the job has 2 ranks",
                     "data_parallel=3 does not divide the job's 2 ranks", "stages=3: the interleaved schedule needs",
                     "balance='time' times each block on a micro-batch: pass example_inputs=",
                     "Number of microbatches (1) must be greater than or equal to the number of stages (2)",
                     "2 stages but the model has only 1 top-level blocks"):
            assert any(want in line for line in lines), (want, lines)


@pytest.mark.timeout(180)
def test_each_stage_checkpoints_its_shard_and_resumes_bitwise(tmp_path):
    # CheckpointManager with the stage and its optimizer saved per rank: a run stopped after step 10
    # and resumed ends bitwise equal to one that ran straight to step 15.
    for mode in ("ckpt_full", "ckpt_part", "ckpt_resume"):
        res = run_ranks([WORKER, str(tmp_path), mode, "4"], world=2, timeout_s=150)
        assert [r[0] for r in res] == [0, 0], (mode, res)
    for rank in range(2):
        full = torch.load(tmp_path / f"ckpt_full{rank}.pt", weights_only=False)
        resumed = torch.load(tmp_path / f"ckpt_resume{rank}.pt", weights_only=False)
        assert resumed["start"] == 10
        assert sorted(full["params"]) == sorted(resumed["params"])
        for n in full["params"]:
            assert torch.equal(full["params"][n], resumed["params"][n]), (rank, n)


@pytest.mark.timeout(120)
def test_shapes_that_do_not_fit_between_stages_are_an_error_on_every_rank(tmp_path):
    res = run_ranks([WORKER, str(tmp_path), "shapes", "4"], world=2, timeout_s=90)
    assert [r[0] for r in res] == [0, 0], res
    for rank, (_, out, _) in enumerate(res):
        lines = rank_lines(out, rank)
        assert len(lines) == 4, out
        assert "stage 1 (blocks ['2']) cannot take stage 0's output of shape (6, 16) float32" in lines[0]
        assert lines[1] == lines[0]  # refused again, not half-run
        assert "the loss cannot take the last stage's output (6, 3) float32 with targets (6, 4) float32" in lines[2]
        assert "then ran" in lines[3]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["dead", "raise"])
def test_a_failed_stage_fails_the_others_fast(tmp_path, mode):
    # "dead": rank 1 exits in its third batch; "raise": a block of the last stage raises. The other
    # rank must fail within seconds (the process group's timeout is 60 s), and a later step refuses.
    res = run_ranks([WORKER, str(tmp_path), mode, "4"], world=2, timeout_s=90)
    if mode == "dead":
        assert res[1][0] == 3
    ranks = [0] if mode == "dead" else [0, 1]
    for rank in ranks:
        assert res[rank][0] == 0, res
        lines = rank_lines(res[rank][1], rank)
        assert len(lines) == 2, res[rank]
        seconds = float(lines[0].split(" after ")[1].split(" s:")[0])
        assert seconds < 10, lines[0]  # the raising rank lives on for 15 s, holding its exception
        assert "failed during the step" in lines[0] and "then: PipelineParallel: stage" in lines[1]
    if mode == "raise":
        assert "block failed on purpose" in res[1][1]


def test_each_rank_holds_only_its_share_of_parameters_and_optimizer_state(tmp_path):
    res = run_ranks([WORKER, str(tmp_path), "1f1b", "4"], world=3, timeout_s=150)
    assert [r[0] for r in res] == [0, 0, 0], res
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(3)]
    model = W.make_model()
    for r in ranks:
        blocks = r["blocks"][[x["stage_ids"] for x in ranks].index(r["stage_ids"])]
        share = sum(p.numel() * 4 for b in blocks for p in model.get_submodule(b).parameters())
        assert r["param_bytes"] == share
        assert r["optimizer_bytes"] == 2 * share  # AdamW's two moments, of this stage only
    assert sum(r["param_bytes"] for r in ranks) == sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.timeout(120)
def test_a_grad_scaler_skips_an_overflowing_step_on_every_stage(tmp_path):
    # Step 2 overflows on stage 0 only; stage 1's scaler must skip it too, as one process would.
    res = run_ranks([WORKER, str(tmp_path), "scaler", "4"], world=2, timeout_s=90)
    assert [r[0] for r in res] == [0, 0], res
    counter = [0, 2]
    model = W.make_model()
    W.poison(model, counter)
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    losses = []
    for step in range(4):
        counter[0] = step
        opt.zero_grad()
        x, y = W.batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        losses.append(float(loss.detach()))
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0 ** 9  # one skipped step halved it
    ranks = [torch.load(tmp_path / f"scaled{r}.pt", weights_only=False) for r in range(2)]
    assert [r["scale"] for r in ranks] == [2.0 ** 9] * 2
    assert ranks[1]["losses"] == pytest.approx(losses, rel=1e-5)
    for n, p in model.named_parameters():
        got = next(r["params"][n] for r in ranks if n in r["params"])
        torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6)
