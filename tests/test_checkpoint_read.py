"""Checkpoints for tools: ``read_checkpoint`` (every tensor and value as saved, every checksum
verified, clear errors), ``export_weights`` (a plain safetensors file that the real safetensors
package and ``load_state_dict`` read, written atomically), and tied weights stored once and tied
again on restore. References: the live state the checkpoint was saved from, element by element.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch as st
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from torch import nn

from trainpatterns.checkpoint import (CheckpointError, CheckpointManager, export_weights, load_weights,
                                      read_checkpoint)
from trainpatterns.checkpoint._format import manifest_crc

HAS_CUDA = torch.cuda.is_available()


class LM(nn.Module):
    """An embedding tied to the output layer (``lm_head.weight is embed.weight``), with a buffer."""

    def __init__(self, vocab: int = 1000, dim: int = 64, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(torch.tanh(self.body(self.embed(ids)))))


class Loader:
    """A per-rank stateful entry (as a data loader is)."""

    def __init__(self, pos: int) -> None:
        self.pos, self.order = pos, torch.arange(pos, pos + 5)

    def state_dict(self) -> dict:
        return {"pos": self.pos, "order": self.order}

    def load_state_dict(self, sd: dict) -> None:
        self.pos, self.order = sd["pos"], sd["order"]


def _trained(seed: int = 0, tie: bool = True):
    torch.manual_seed(seed)
    model = LM(tie=tie)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randint(0, 1000, (8,))).logsumexp(-1).mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _save(tmp_path: Path, state: dict, step: int = 7, **kw) -> Path:
    mgr = CheckpointManager(tmp_path / "ckpt", async_save=False, **kw)
    mgr.save(state, step, metrics={"val_loss": 0.25})
    return tmp_path / "ckpt" / f"step_{step:08d}"


def _reseal(d: Path, **manifest_fields) -> None:
    """Make the manifest vouch for every file it lists (and ``extra`` ones) as they are now."""
    m = json.loads((d / "manifest.json").read_text())
    m.update(manifest_fields)
    for name in m["files"]:
        data = (d / name).read_bytes()
        m["files"][name] = {"size": len(data), "crc32": zlib.crc32(data)}
    m["crc32"] = manifest_crc({k: v for k, v in m.items() if k != "crc32"})
    (d / "manifest.json").write_text(json.dumps(m))


# ----- read_checkpoint ------------------------------------------------------------------------------

def test_read_checkpoint_returns_every_tensor_and_value_as_saved(tmp_path):
    model, opt, sched = _trained(tie=False)
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    state = {"model": model, "opt": opt, "sched": sched, "loader": Loader(3),
             "extra": {"t": torch.randn(4), "arr": arr, "n": 5, "name": "x", "empty": []}, "epoch": 2}
    live = {k: v.state_dict() for k, v in state.items() if hasattr(v, "state_dict")}
    rng = torch.get_rng_state()
    path = _save(tmp_path, state)
    tensors, meta = read_checkpoint(path)

    expected = {f"model.{k}": v for k, v in live["model"].items()}
    expected.update({f"opt.state.{i}.{k}": v for i, s in live["opt"]["state"].items() for k, v in s.items()
                     if isinstance(v, torch.Tensor)})
    expected.update({"loader.order": state["loader"].order, "extra.t": state["extra"]["t"],
                     "extra.arr": torch.from_numpy(arr)})
    assert sorted(tensors) == sorted(expected)
    for name, t in expected.items():
        torch.testing.assert_close(tensors[name], t, rtol=0, atol=0, msg=name)
        assert tensors[name].device.type == "cpu"
    assert meta["step"] == 7 and meta["metrics"] == {"val_loss": 0.25} and meta["world_size"] == 1
    assert meta["rank"] == 0 and meta["per_rank"] == ["loader"] and isinstance(meta["time"], float)
    assert meta["entries"] == {"model": "module", "opt": "optimizer", "sched": "lr_scheduler", "extra": "value",
                               "epoch": "value", "loader": "stateful"}
    values = meta["values"]
    group = live["opt"]["param_groups"][0]
    assert values["opt.param_groups.0.lr"] == group["lr"] and values["opt.param_groups.0.betas.1"] == group["betas"][1]
    assert values["sched.last_epoch"] == live["sched"]["last_epoch"] == 2
    assert values["extra.n"] == 5 and values["extra.name"] == "x" and values["extra.empty"] == []
    assert values["epoch"] == 2 and values["loader.pos"] == 3
    assert not set(values) & set(tensors)
    assert torch.equal(meta["rng"]["torch"], rng)


def test_read_checkpoint_refuses_what_is_not_one_checkpoint(tmp_path):
    path = _save(tmp_path, {"model": nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match=r"is a directory of checkpoints, not one checkpoint.*step_00000007"):
        read_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint"):
        read_checkpoint(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        read_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize("fname", ["model.safetensors", "state.json", "rank_00000.json"])
def test_read_checkpoint_names_a_damaged_or_missing_file(tmp_path, fname):
    path = _save(tmp_path, {"model": nn.Linear(2, 2), "loader": Loader(1)})
    data = bytearray((path / fname).read_bytes())
    data[-2] ^= 0x40
    (path / fname).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{fname}.*(checksum|corrupt)"):
        read_checkpoint(path)
    (path / fname).unlink()
    with pytest.raises(CheckpointError, match=f"{fname}"):
        read_checkpoint(path)


def test_read_checkpoint_verifies_files_it_does_not_need(tmp_path):
    # A file only another rank reads (here: one the manifest lists beside this rank's) is still checked.
    path = _save(tmp_path, {"model": nn.Linear(2, 2)})
    (path / "notes.bin").write_bytes(b"abcdefgh")
    _reseal(path, files={**json.loads((path / "manifest.json").read_text())["files"], "notes.bin": {}})
    read_checkpoint(path)
    (path / "notes.bin").write_bytes(b"abcdefgX")
    with pytest.raises(CheckpointError, match="notes.bin fails its checksum"):
        read_checkpoint(path)


def _two_ranks(tmp_path: Path) -> Path:
    """A checkpoint of 2 ranks whose per-rank entry differs: rank 1's files are those of a second
    save with another loader position, renamed and resealed."""
    path = _save(tmp_path / "a", {"model": nn.Linear(2, 2), "loader": Loader(1)})
    other = _save(tmp_path / "b", {"model": nn.Linear(2, 2), "loader": Loader(40)})
    shutil.copy(other / "rank_00000.safetensors", path / "rank_00001.safetensors")
    doc = json.loads((other / "rank_00000.json").read_text())
    doc.update(rank=1, file="rank_00001.safetensors")
    (path / "rank_00001.json").write_text(json.dumps(doc))
    files = json.loads((path / "manifest.json").read_text())["files"]
    _reseal(path, world_size=2, files={**files, "rank_00001.json": {}, "rank_00001.safetensors": {}})
    return path


def test_read_checkpoint_of_several_ranks_needs_a_rank_for_per_rank_entries(tmp_path):
    path = _two_ranks(tmp_path)
    with pytest.raises(ValueError, match=r"written by 2 ranks and holds per-rank entries \['loader'\].*"
                                         r"rank= \(0 to 1\)"):
        read_checkpoint(path)
    for rank, pos in ((0, 1), (1, 40)):
        tensors, meta = read_checkpoint(path, rank=rank)
        assert meta["rank"] == rank and meta["values"]["loader.pos"] == pos and meta["world_size"] == 2
        torch.testing.assert_close(tensors["loader.order"], torch.arange(pos, pos + 5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank must be 0 to 1, got 2"):
        read_checkpoint(path, rank=2)
    with pytest.raises(TypeError, match="rank must be an int"):
        read_checkpoint(path, rank="1")
    (path / "rank_00001.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="rank_00001.safetensors"):
        read_checkpoint(path, rank=0)  # rank 0 does not read it, but every checksum is verified


def test_read_checkpoint_of_several_ranks_without_per_rank_entries_gives_the_replicated_ones(tmp_path):
    lin = nn.Linear(3, 2)
    path = _save(tmp_path, {"model": lin}, rng=False)
    shutil.copy(path / "rank_00000.json", path / "rank_00001.json")
    _reseal(path, world_size=2, files={**json.loads((path / "manifest.json").read_text())["files"],
                                       "rank_00001.json": {}})
    tensors, meta = read_checkpoint(path)
    assert meta["rank"] is None and meta["rng"] is None and meta["per_rank"] == []
    torch.testing.assert_close(tensors["model.weight"], lin.weight.detach(), rtol=0, atol=0)


# ----- export_weights ---------------------------------------------------------------------------

def test_export_weights_is_a_plain_safetensors_model_file(tmp_path):
    model, opt, _ = _trained(tie=False)
    path = _save(tmp_path, {"model": model, "opt": opt, "step": 3})
    out = export_weights(path, tmp_path / "model.safetensors")
    assert out == str(tmp_path / "model.safetensors")
    loaded = st.load_file(out)
    fresh = LM(tie=False)
    assert fresh.load_state_dict(loaded, strict=True) is not None
    for name, t in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], t, rtol=0, atol=0, msg=name)
    with st.safe_open(out, "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_export_weights_chooses_the_module_and_refuses_what_is_not_a_state_dict(tmp_path):
    a, b = nn.Linear(2, 3), nn.Linear(3, 1)
    path = _save(tmp_path, {"model": a, "ema": b, "step": 3})
    with pytest.raises(ValueError, match=r"holds 2 modules \['model', 'ema'\]: pass key="):
        export_weights(path, tmp_path / "w.safetensors")
    export_weights(path, tmp_path / "w.safetensors", key="ema")
    torch.testing.assert_close(st.load_file(tmp_path / "w.safetensors")["weight"], b.weight.detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a dict of name -> tensor"):
        export_weights(path, tmp_path / "s.safetensors", key="step")
    with pytest.raises(ValueError, match="has no entry 'nope'"):
        export_weights(path, tmp_path / "s.safetensors", key="nope")
    assert not (tmp_path / "s.safetensors").exists()


def test_export_weights_refuses_bad_destinations(tmp_path):
    path = _save(tmp_path, {"model": nn.Linear(2, 3)})
    with pytest.raises(ValueError, match="inside the checkpoint"):
        export_weights(path, path / "model.safetensors")
    with pytest.raises(ValueError, match="is a directory"):
        export_weights(path, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_weights(path, tmp_path / "no" / "w.safetensors")
    (path / "model.safetensors").write_bytes(b"\0" * 40)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        export_weights(path, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


def test_export_weights_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    import trainpatterns.checkpoint.tools as tools

    lin = nn.Linear(2, 3)
    path = _save(tmp_path, {"model": lin})
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"the old file")
    real = tools.write_safetensors

    def dies_after_writing(p, tensors, metadata):
        real(p, tensors, metadata)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tools, "write_safetensors", dies_after_writing)
    with pytest.raises(CheckpointError, match="cannot write .*w.safetensors: No space left"):
        export_weights(path, out)
    assert out.read_bytes() == b"the old file" and sorted(os.listdir(tmp_path)) == ["ckpt", "w.safetensors"]
    monkeypatch.undo()
    export_weights(path, out)
    torch.testing.assert_close(st.load_file(out)["weight"], lin.weight.detach(), rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "w.safetensors"]


# ----- tied weights -------------------------------------------------------------------------------

def test_tied_weights_are_stored_once_and_stay_tied_after_restore(tmp_path):
    model, opt, _ = _trained()
    one_copy = model.embed.weight.numel() * 4
    path = _save(tmp_path, {"model": model, "opt": opt})
    size = os.path.getsize(path / "model.safetensors")
    assert one_copy < size < 1.2 * one_copy, f"{size} bytes for a {one_copy}-byte tied matrix"
    with st.safe_open(path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and f.metadata()["lm_head.weight"] == "embed.weight"

    torch.manual_seed(1)
    fresh = LM()
    state = {"model": fresh, "opt": torch.optim.AdamW(fresh.parameters(), lr=1e-3)}
    CheckpointManager(tmp_path / "ckpt").restore(state)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], t, rtol=0, atol=0, msg=name)
    # load_state_dict copies into the live parameters in place: the tie of the live model holds.
    assert fresh.lm_head.weight is fresh.embed.weight
    with torch.no_grad():
        fresh.embed.weight[3, 5] = 42.0
    assert fresh.lm_head.weight[3, 5].item() == 42.0
    for p, q in zip(state["opt"].state.values(), opt.state.values()):
        torch.testing.assert_close(p["exp_avg"], q["exp_avg"], rtol=0, atol=0)

    tensors, _ = read_checkpoint(path)
    assert tensors["model.lm_head.weight"] is tensors["model.embed.weight"]

    # An untied live model takes the values into both of its tensors; it is not tied by a restore.
    untied = LM(tie=False)
    load_weights(untied, path)
    assert untied.lm_head.weight is not untied.embed.weight
    torch.testing.assert_close(untied.lm_head.weight.detach(), model.embed.weight.detach(), rtol=0, atol=0)


def test_tied_values_are_one_tensor_again_after_restore(tmp_path):
    t = torch.randn(5)
    loader = Loader(2)
    loader.order = torch.randn(3)
    state = {"pair": {"a": t, "b": t, "same": t.view(5), "copy": t.clone(), "part": t[1:]},
             "loader": loader, "more": {"x": loader.order, "y": loader.order}}
    _save(tmp_path, state, per_rank=["loader", "more"])  # two per-rank entries share the rank's file
    fresh = {"pair": None, "loader": Loader(0), "more": None}
    CheckpointManager(tmp_path / "ckpt").restore(fresh)
    pair = fresh["pair"]
    assert pair["a"] is pair["b"] is pair["same"]
    # A copy is another tensor; a part of one (other shape) is stored, and restored, on its own.
    assert pair["copy"] is not pair["a"]
    assert pair["part"].untyped_storage().data_ptr() != pair["a"].untyped_storage().data_ptr()
    for k in ("a", "b", "same", "copy"):
        torch.testing.assert_close(pair[k], t, rtol=0, atol=0)
    torch.testing.assert_close(pair["part"], t[1:], rtol=0, atol=0)
    assert fresh["more"]["x"] is fresh["more"]["y"]
    torch.testing.assert_close(fresh["more"]["x"], loader.order, rtol=0, atol=0)
    torch.testing.assert_close(fresh["loader"].order, loader.order, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_tied_values_moved_to_the_gpu_stay_one_tensor(tmp_path):
    t = torch.randn(5, device="cuda")
    _save(tmp_path, {"pair": {"a": t, "b": t}})
    fresh = {"pair": {"a": torch.zeros(5, device="cuda"), "b": torch.zeros(5, device="cuda")}}
    CheckpointManager(tmp_path / "ckpt").restore(fresh)
    assert fresh["pair"]["a"].is_cuda and fresh["pair"]["a"] is fresh["pair"]["b"]
    torch.testing.assert_close(fresh["pair"]["a"], t, rtol=0, atol=0)


def test_export_of_a_tied_model_loads_as_safetensors_save_model_files_do(tmp_path):
    model, _, _ = _trained()
    path = _save(tmp_path, {"model": model})
    out = export_weights(path, tmp_path / "tied.safetensors")
    with st.safe_open(out, "pt") as f:
        assert sorted(f.keys()) == sorted(k for k in model.state_dict() if k != "lm_head.weight")
        assert f.metadata() == {"format": "pt", "lm_head.weight": "embed.weight"}
    reference = model.state_dict()
    for load in ("load_model", "load_file", "load_weights"):
        fresh = LM()
        if load == "load_model":
            st.load_model(fresh, out)  # strict
        elif load == "load_file":
            result = fresh.load_state_dict(st.load_file(out), strict=False)
            assert result.missing_keys == ["lm_head.weight"] and result.unexpected_keys == []
        else:
            load_weights(fresh, out)  # strict
        assert fresh.lm_head.weight is fresh.embed.weight
        for name, t in reference.items():
            torch.testing.assert_close(fresh.state_dict()[name], t, rtol=0, atol=0, msg=f"{load}: {name}")


# A state of plain values whose leaves are drawn from a few base tensors and views of them: after a
# save and restore, two leaves are one tensor object exactly when they were the same tensor (same
# bytes, shape and strides) when saved, and every leaf holds its saved values.
_VIEWS = {"self": lambda t: t, "view": lambda t: t.view(t.shape), "tail": lambda t: t[1:], "T": lambda t: t.t()}


def _same_tensor(leaf: tuple) -> tuple:
    """What a leaf is as bytes, shape and strides: a full view of a base is the base itself."""
    base, view = leaf
    return base, "self" if view == "view" else view


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hs.lists(hs.tuples(hs.integers(0, 2), hs.sampled_from(sorted(_VIEWS))), min_size=1, max_size=8),
       hs.randoms(use_true_random=False))
def test_property_ties_survive_a_round_trip(tmp_path, leaves, rnd):
    bases = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    tensors = [_VIEWS[v](bases[b]) for b, v in leaves]
    layout = rnd.choice(["list", "dict", "nested"])
    if layout == "list":
        value = list(tensors)
    elif layout == "dict":
        value = {f"k{i}": t for i, t in enumerate(tensors)}
    else:
        value = {"a": tensors[: len(tensors) // 2], "b": tuple(tensors[len(tensors) // 2:])}
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    mgr = CheckpointManager(d, async_save=False, rng=False)
    mgr.save({"v": value}, 1)
    state = {"v": None}
    mgr.restore(state)
    got = state["v"] if layout != "dict" else list(state["v"].values())
    if layout == "nested":
        got = list(got["a"]) + list(got["b"])
    flat, _ = read_checkpoint(d / "step_00000001")
    read = list(flat.values())
    assert len(got) == len(tensors)
    for i, (g, t) in enumerate(zip(got, tensors)):
        torch.testing.assert_close(g, t, rtol=0, atol=0)
        for j in range(i):
            assert (g is got[j]) == (_same_tensor(leaves[i]) == _same_tensor(leaves[j])), (leaves, i, j)
    assert len({id(t) for t in read}) == len({id(t) for t in got})
    shutil.rmtree(d)
