"""The Trainer under torchrun tells one story: it joins the job by itself, splits the global batch,
evaluates each rank's shard with rank 0's BatchNorm statistics and reduces the metrics, so both ranks
hold the same records, the same best checkpoint, the same early stop and the same weights; the inner
steps of an accumulated optimizer step do not all-reduce. The rank script is tests/_trainer_worker.py."""
from __future__ import annotations

import json
import os
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


ASYNC_WORKER = str(Path(__file__).with_name("_trainer_async_worker.py"))


@pytest.mark.timeout(180)
def test_the_trainer_trains_with_parameter_servers(tmp_path):
    # strategy="async" on 3 ranks: rank 0 serves, ranks 1 and 2 run the Trainer's loop on their halves;
    # the budget is the plan's steps (applied updates), the servers checkpoint, the first worker writes
    # metrics.jsonl, and every rank ends with the servers' final weights.
    import _trainer_async_worker as A

    res = run_ranks([ASYNC_WORKER, str(tmp_path)], world=3, timeout_s=150)
    assert [r[0] for r in res] == [0, 0, 0], res
    ranks = [torch.load(tmp_path / f"async{r}.pt", weights_only=False) for r in range(3)]
    for r in ranks[1:]:
        for k in ranks[0]["state"]:
            assert torch.equal(r["state"][k], ranks[0]["state"][k]), k
    stats = ranks[0]["stats"]
    assert stats["updates"] == A.UPDATES and stats["dropped"] == []
    assert sum(w["updates"] for w in stats["workers"].values()) == A.UPDATES
    assert ranks[1]["steps"] + ranks[2]["steps"] >= A.UPDATES  # a push after the end is not applied
    assert ranks[0]["history"] == []  # the server trains nothing itself
    history = ranks[1]["history"]
    torch.manual_seed(0)  # the server's (rank 0's) initial model, where every worker started
    start = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    xv, yv = A.pendulum_data(256, seed=1)
    with torch.no_grad():
        initial = F.mse_loss(start(xv), yv).item()
    assert history and history[-1]["val_loss"] < 0.5 * initial
    written = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert written == history
    saved = sorted(os.listdir(tmp_path / "run" / "servers" / "server_0"))
    assert saved and saved[-1].startswith("step_") and int(saved[-1][5:]) == A.UPDATES
