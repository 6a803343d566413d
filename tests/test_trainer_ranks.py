"""The Trainer under torchrun tells one story: it joins the job by itself, splits the global batch,
evaluates each rank's shard with rank 0's BatchNorm statistics and reduces the metrics, so both ranks
hold the same records, the same best checkpoint, the same early stop and the same weights; the inner
steps of an accumulated optimizer step do not all-reduce. The rank script is tests/_trainer_worker.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import _trainer_worker as W  # noqa: E402
from _ranks import run_ranks  # noqa: E402

WORKER = str(Path(__file__).with_name("_trainer_worker.py"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_ranks")
    res = run_ranks([WORKER, str(out), "2"], world=2, timeout_s=150)
    assert [r[0] for r in res] == [0, 0], res
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], res


@pytest.mark.timeout(180)
def test_both_ranks_hold_one_story(ranks):
    out, (r0, r1), res = ranks
    assert r0["world"] == r1["world"] == 2, "the Trainer did not join the torchrun job"
    assert "joined the torchrun job" not in res[1][1] + res[1][2], "rank 1 spoke"
    assert r0["history"] == r1["history"]  # every key, times included: rank 0's record on every rank
    assert r0["best"] == r1["best"] and r0["listing"] == r1["listing"]
    assert all("val_acc" in m and "val_loss" in m for m in r0["history"])
    best = max(r0["history"], key=lambda m: (m["val_acc"], -m["step"]))
    assert r0["best"]["step"] == best["step"]
    written = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    assert written == r0["history"]
    for k in r0["state"]:  # BatchNorm running statistics included
        assert torch.equal(r0["state"][k], r1["state"][k]), k


@pytest.mark.timeout(180)
def test_global_batch_splits_over_ranks_and_accumulation(ranks):
    _, (r0, _), _ = ranks
    assert r0["batch_size"] == W.GLOBAL_BATCH // (2 * 2)  # 2 ranks x accumulate=2
    assert r0["total_steps"] == 36  # 6 passes over 96 rows at 16 examples per optimizer step
    assert r0["inner_all_reduces"] == 1  # one bucket all-reduced once per optimizer step, not per micro-batch


@pytest.mark.timeout(180)
def test_test_and_predict_match_plain_torch_on_the_whole_set(ranks):
    _, (r0, r1), _ = ranks
    model = W.make_model()
    model.load_state_dict(r0["state"])
    model.eval()
    x, y = W.make_data(1, W.VAL_ROWS)
    with torch.no_grad():
        out = model(x)
    want_loss = F.cross_entropy(out.double(), y).item()
    want_acc = (out.argmax(1) == y).double().mean().item()
    for r in (r0, r1):
        assert r["test"]["test_loss"] == pytest.approx(want_loss, rel=1e-6, abs=1e-7)
        assert r["test"]["val_acc"] == pytest.approx(want_acc, abs=1e-7)  # the metric returns float32 means
        torch.testing.assert_close(r["predict"], out, rtol=1e-6, atol=1e-6)
    assert r0["test"] == r1["test"]
