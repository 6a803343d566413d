"""Trainer(strategy="pipeline") against the single-process Trainer on the same data: 2 stages (1F1B
and interleaved), and 2 stages x 2 replicas against SyncDataParallel on 2 ranks; records, test scores, predictions and every parameter agree
(fp32, stated tolerances), and a run SIGKILLed after a checkpoint resumes to the same bits as an
uninterrupted one. Rank script: tests/_trainer_pipeline_worker.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _trainer_pipeline_worker as W  # noqa: E402
from _ranks import run_ranks  # noqa: E402

WORKER = str(Path(__file__).with_name("_trainer_pipeline_worker.py"))
KEYS = ("epoch", "step", "train_loss", "val_loss", "close", "lr")


def reference(tmp_path):
    trainer = W.make_trainer(str(tmp_path / "ref"), "sync", {})
    history = trainer.fit()
    return (history, trainer.test(W.make_data(2, 23)), trainer.predict(W.make_data(2, 23)[0]),
            dict(trainer.model.named_parameters()))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode,schedule,world", [("full", "1f1b", 2), ("full", "interleaved", 2), ("dp", "1f1b", 4)])
def test_the_pipeline_trainer_matches_one_process(tmp_path, mode, schedule, world):
    res = run_ranks([WORKER, str(tmp_path), mode, schedule], world=world, timeout_s=200)
    assert [r[0] for r in res] == [0] * world, res
    ranks = [torch.load(tmp_path / f"{mode}{r}.pt", weights_only=False) for r in range(world)]
    if mode == "dp":  # replicas read their own shards: the reference is data parallelism on 2 ranks
        (tmp_path / "sync").mkdir()
        res = run_ranks([WORKER, str(tmp_path / "sync"), "sync", schedule], world=2, timeout_s=200)
        assert [r[0] for r in res] == [0, 0], res
        ref = torch.load(tmp_path / "sync" / "sync0.pt", weights_only=False)
        history, scores, predictions, params = ref["history"], ref["test"], ref["predictions"], ref["params"]
    else:
        history, scores, predictions, params = reference(tmp_path)
    for r in ranks:  # every rank holds the same story, equal to one process's
        assert len(r["history"]) == len(history) == 4
        for got, want in zip(r["history"], history):
            for k in KEYS:
                assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (k, got, want)
        assert r["test"] == pytest.approx(scores, rel=1e-4, abs=1e-6)
        torch.testing.assert_close(r["predictions"], predictions, rtol=1e-4, atol=1e-5)
    seen = {}
    for r in ranks:
        seen.update(r["params"])
    assert sorted(seen) == sorted(params)
    for n, p in params.items():
        torch.testing.assert_close(seen[n], p.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_a_killed_pipeline_run_resumes_bitwise(tmp_path):
    full = tmp_path / "full"
    cut = tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    res = run_ranks([WORKER, str(full), "full", "1f1b"], world=2, timeout_s=200)
    assert [r[0] for r in res] == [0, 0], res
    res = run_ranks([WORKER, str(cut), "kill", "1f1b"], world=2, timeout_s=200)
    assert [r[0] for r in res] == [-9, -9], res
    res = run_ranks([WORKER, str(cut), "resume", "1f1b"], world=2, timeout_s=200)
    assert [r[0] for r in res] == [0, 0], res
    assert "resumed from step 12" in res[0][1] + res[0][2]
    for rank in range(2):
        a = torch.load(full / f"full{rank}.pt", weights_only=False)
        b = torch.load(cut / f"resume{rank}.pt", weights_only=False)
        for n in a["params"]:
            assert torch.equal(a["params"][n], b["params"][n]), (rank, n)
        assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
        assert a["lr"] == b["lr"]
