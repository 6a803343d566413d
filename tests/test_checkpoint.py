"""trainpatterns.checkpoint: exact round trips, atomicity under SIGKILL, integrity, async, retention,
RNG, distributed restore, virtual epochs.

References: the objects' own state before saving (compared exactly, types included, with a bitwise
tensor comparison so NaNs and -0.0 count), uninterrupted runs (for resume), the official
`safetensors` package (for the file format), and plain arithmetic (for retention and the plan).
Subprocess runs live in tests/_checkpoint_worker.py.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import trainpatterns as tp
from trainpatterns.checkpoint import CheckpointError, CheckpointManager, VirtualEpochs, load_weights
from trainpatterns.checkpoint import _format, writer as writer_mod

from _holder import Holder
from _ranks import run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_checkpoint_worker.py")
# Where the imported trainpatterns lives (the source tree's python/ or site-packages): the worker
# processes must import the same build, compiled _C included.
PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(tp.__file__)))


# --------------------------------------------------------------------------------------------------
# helpers

def same(a, b, path="") -> None:
    """Assert a and b are identical: same types, same keys in the same order, tensors with the same
    dtype, shape, device and bytes, floats with the same bits."""
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        ab = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        bb = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(ab, bb), f"{path}: tensor bytes differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), f"{path}: {a} vs {b}"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} vs {list(b)}"
        for (ka, va), kb in zip(a.items(), b.keys()):
            assert type(ka) is type(kb), f"{path}: key types {type(ka)} vs {type(kb)}"
            same(va, b[kb], f"{path}[{ka!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def all_dtypes():
    out = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]
    for name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            out.append(getattr(torch, name))
    return out


def sample_tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(dtype)
        flat = t.reshape(-1)
        if flat.numel() >= 4 and dtype not in (torch.float8_e4m3fn,):
            flat[:4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")]).to(dtype)
        return t
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    hi = {torch.uint8: 256, torch.int8: 127}.get(dtype, 2**15)
    return torch.randint(0, hi, shape, generator=g).to(dtype)


def tricky_tree():
    tensors = {str(d).removeprefix("torch."): [sample_tensor(d, s, i) for i, s in enumerate([(278011,), (17, 3), (0, 5), ()])]
               for d in all_dtypes()}
    return {
        "ints": [0, -1, 2**70, -(2**63), True, False, None],
        "floats": [0.1, -0.0, 5e-324, 1.7976931348623157e308, float("inf"), float("-inf"), float("nan"), 1 / 3],
        "int_keys": {0: "a", 3: {"b": (1, 2.5, None)}, -7: []},
        "odd_keys": {(1, "x"): "tuple key", 1.5: "float key", None: "none key", False: 0},
        "$dollar": "a key that looks like a tag",
        "": "empty key",
        "nested": ((), [()], {"x": ({},)}, [[[]]]),
        "bytes": b"\x00\xff\x10",
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "np": np.arange(7, dtype=np.int16),
        "np_u32": np.array([2**32 - 1, 0], dtype=np.uint32),
        "np_scalars": [np.float32(1.25), np.int64(-3), np.float64("nan")],
        "strided": torch.arange(60.0).reshape(6, 10)[:, 3],
        "tensors": tensors,
    }


def small_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(17, 3))


def train_steps(model, opt, steps, seed, sched=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(9, 13, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def flip_byte(path, offset_from_end=5):
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        b = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x55]))


def run_worker(*args, timeout=120, **env):
    full_env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, WORKER, *map(str, args)], env=full_env, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------------------------------
# format and round trips

def test_value_tree_round_trips_exactly(tmp_path):
    tree = tricky_tree()
    holder = Holder(tricky_tree())
    mgr = CheckpointManager(tmp_path, async_save=False)
    mgr.save({"tree": tree, "holder": holder}, 0)
    state = {"tree": None, "holder": Holder()}
    assert mgr.restore(state) == 0
    same(tree, state["tree"])
    same(holder.value, state["holder"].value)


def test_official_safetensors_reads_ours_and_we_read_theirs(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {f"{d}-{i}": sample_tensor(d, s, i) for d in all_dtypes() for i, s in enumerate([(1001,), (3, 0), (), (2, 3, 5)])}
    ours = str(tmp_path / "ours.safetensors")
    _format.write_safetensors(ours, tensors, {"k": "v"})
    theirs_view = st.load_file(ours)
    for k, t in tensors.items():
        same(t, theirs_view[k], k)
    from safetensors import safe_open
    with safe_open(ours, "pt") as f:
        assert f.metadata() == {"k": "v"}
    theirs = str(tmp_path / "theirs.safetensors")
    st.save_file(tensors, theirs, metadata={"a": "b"})
    back, meta = _format.read_safetensors(theirs)
    assert meta == {"a": "b"} and list(sorted(back)) == sorted(tensors)
    for k, t in tensors.items():
        same(t, back[k], k)
    # a checkpoint's module file is a plain weights file for other tools
    model = small_model()
    mgr = CheckpointManager(tmp_path / "ck", async_save=False)
    mgr.save({"model": model}, 3)
    loaded = st.load_file(str(tmp_path / "ck" / "step_00000003" / "model.safetensors"))
    same(dict(model.state_dict()), {k: loaded[k] for k in model.state_dict()})


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True, betas=(0.8, 0.95)),
    lambda p: tp.FusedAdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.SGD([{"params": p[:2], "lr": 0.1}, {"params": p[2:], "momentum": 0.9}], lr=1e-2),
], ids=["torch-AdamW-amsgrad", "FusedAdamW", "SGD-two-groups"])
def test_optimizer_and_schedule_resume_bitwise(tmp_path, make_opt):
    model = small_model(0)
    opt = make_opt(list(model.parameters()))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    train_steps(model, opt, 5, seed=1, sched=sched)
    mgr = CheckpointManager(tmp_path, async_save=False, rng=False)
    mgr.save({"model": model, "opt": opt, "sched": sched, "scaler": scaler}, 5)
    saved_opt_state = opt.state_dict()
    train_steps(model, opt, 5, seed=2, sched=sched)
    reference = [p.detach().clone() for p in model.parameters()]

    model2 = small_model(123)
    opt2 = make_opt(list(model2.parameters()))
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=20)
    scaler2 = torch.amp.GradScaler("cpu")
    assert mgr.restore({"model": model2, "opt": opt2, "sched": sched2, "scaler": scaler2}) == 5
    restored = opt2.state_dict()
    same(saved_opt_state["param_groups"], restored["param_groups"])
    assert list(restored["state"]) == list(saved_opt_state["state"])  # int keys, same order
    assert sched2.last_epoch == 5 and scaler2.get_scale() == 1024.0
    train_steps(model2, opt2, 5, seed=2, sched=sched2)
    for a, b in zip(reference, model2.parameters()):
        assert torch.equal(a, b)


def test_rng_saved_restored_and_opt_out(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    mgr = CheckpointManager(tmp_path / "on", async_save=False)
    mgr.save({"n": 1}, 1)
    expect = (random.random(), np.random.rand(), torch.rand(4))
    random.random(), np.random.rand(), torch.rand(4)  # move on
    mgr.restore({"n": 0})
    got = (random.random(), np.random.rand(), torch.rand(4))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])

    off = CheckpointManager(tmp_path / "off", async_save=False, rng=False)
    off.save({"n": 1}, 1)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    first = (random.random(), np.random.rand(), torch.rand(4))
    off.restore({"n": 0})  # must leave the generators where they are
    second = (random.random(), np.random.rand(), torch.rand(4))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    ref = [(random.random(), np.random.rand(), torch.rand(4)) for _ in range(2)]
    assert first[:2] == ref[0][:2] and second[:2] == ref[1][:2] and torch.equal(second[2], ref[1][2])
    doc = json.load(open(tmp_path / "off" / "step_00000001" / "rank_00000.json"))
    assert doc["rng"] is None


def test_plain_values_replace_entries_and_missing_entries_fail(tmp_path):
    mgr = CheckpointManager(tmp_path, async_save=False)
    model = small_model()
    mgr.save({"model": model, "epoch": 7, "best": float("nan")}, 1)
    state = {"model": small_model(5), "epoch": 0, "best": 0.0}
    with pytest.warns(RuntimeWarning, match="also holds"):
        mgr.restore({"epoch": None})
    mgr.restore(state)
    assert state["epoch"] == 7 and math.isnan(state["best"])
    before = [p.clone() for p in state["model"].parameters()]
    with pytest.raises(CheckpointError, match="no entry for \\['opt'\\]"):
        mgr.restore({"model": state["model"], "opt": torch.optim.SGD(state["model"].parameters(), lr=1)})
    with pytest.raises(CheckpointError, match="is a value here but a module"):
        mgr.restore({"model": 3})
    for a, b in zip(before, state["model"].parameters()):
        assert torch.equal(a, b)  # nothing applied by a failed restore


def test_saved_device_falls_back_to_cpu_when_missing():
    t = torch.arange(5.0)
    node = {"$tensor": "x", "device": "cuda:7"}
    out = _format.decode_tree(node, {"x": t})
    assert out.device.type == "cpu" and torch.equal(out, t)
    live = torch.zeros(5, dtype=torch.float32)
    assert _format.decode_tree(node, {"x": t}, live).device == live.device


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("async_save", [True, False])
def test_cuda_state_round_trips_to_cuda(tmp_path, async_save):
    model = small_model().cuda()
    opt = tp.FusedAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(9, 13, device="cuda")
    model(x).sum().backward()
    opt.step()
    mgr = CheckpointManager(tmp_path, async_save=async_save)
    mgr.save({"model": model, "opt": opt}, 1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)  # the snapshot must be taken before this
    mgr.wait()
    model2 = small_model(3).cuda()
    opt2 = tp.FusedAdamW(model2.parameters(), lr=1e-2)
    mgr.restore({"model": model2, "opt": opt2})
    for k, v in model2.state_dict().items():
        assert v.is_cuda and torch.equal(v, saved[k])
    for s in opt2.state.values():
        assert s["exp_avg"].is_cuda


# --------------------------------------------------------------------------------------------------
# integrity

def _three_checkpoints(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=None, async_save=False)
    weights = {}
    model, opt = small_model(0), None
    opt = tp.FusedAdamW(model.parameters(), lr=1e-2)
    for step in (1, 2, 3):
        train_steps(model, opt, 1, seed=step)
        mgr.save({"model": model, "opt": opt, "loader": Holder({"pos": step})}, step, {"loss": 1.0 / step})
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return mgr, weights


CORRUPTIONS = {
    "flip-tensor-byte": lambda d: flip_byte(d / "model.safetensors"),
    "flip-header-byte": lambda d: flip_byte(d / "opt.safetensors", os.path.getsize(d / "opt.safetensors") - 20),
    "truncate-tensors": lambda d: os.truncate(d / "opt.safetensors", os.path.getsize(d / "opt.safetensors") - 7),
    "flip-state-json": lambda d: flip_byte(d / "state.json", 30),
    "flip-rank-file": lambda d: flip_byte(d / "rank_00000.safetensors"),
    "remove-rank-json": lambda d: os.remove(d / "rank_00000.json"),
    "flip-manifest": lambda d: flip_byte(d / "manifest.json", 40),
    "remove-manifest": lambda d: os.remove(d / "manifest.json"),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_corrupt_latest_falls_back_named_one_raises(tmp_path, corrupt):
    mgr, weights = _three_checkpoints(tmp_path)
    bad = tmp_path / "step_00000003"
    CORRUPTIONS[corrupt](bad)
    model = small_model(9)
    state = {"model": model, "opt": tp.FusedAdamW(model.parameters(), lr=1e-2), "loader": Holder()}
    with pytest.warns(RuntimeWarning, match="step_00000003"):
        assert mgr.restore(state) == 2
    same(weights[2], dict(model.state_dict()))
    assert state["loader"].value == {"pos": 2}
    with pytest.raises(CheckpointError, match="step_00000003"):
        mgr.restore(state, str(bad))
    with pytest.raises(CheckpointError):
        mgr.restore(state, 3)
    infos = {i.step: i for i in mgr.list(verify=True)}
    assert not infos[3].valid and infos[3].problem and infos[1].valid and infos[2].valid


def test_all_corrupt_raises_and_empty_returns_none(tmp_path):
    assert CheckpointManager(tmp_path / "empty").restore({"x": 1}) is None
    mgr, _ = _three_checkpoints(tmp_path / "ck")
    for step in (1, 2, 3):
        flip_byte(tmp_path / "ck" / f"step_{step:08d}" / "model.safetensors")
    model = small_model()
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        mgr.restore({"model": model, "opt": tp.FusedAdamW(model.parameters()), "loader": Holder()})


def test_leftover_temporary_directories_are_invisible_and_removed(tmp_path):
    mgr = CheckpointManager(tmp_path, async_save=False)
    mgr.save({"n": 1}, 1)
    junk = tmp_path / ".tmp-step_00000009"
    junk.mkdir()
    (junk / "state.json").write_text("{partial")
    assert [i.step for i in mgr.list()] == [1]
    assert mgr.restore({"n": 0}) == 1
    CheckpointManager(tmp_path)
    assert not junk.exists() and (tmp_path / "step_00000001").exists()


# --------------------------------------------------------------------------------------------------
# atomicity under SIGKILL

def _check_after_kill(directory, committed):
    """Every visible checkpoint is whole and holds what its step says; every committed one is there."""
    names = os.listdir(directory)
    assert all(n.startswith("step_") or n.startswith(".tmp-") for n in names), names
    infos = CheckpointManager(directory, keep_last=None).list(verify=True)
    assert not [n for n in os.listdir(directory) if n.startswith(".tmp-")]  # cleaned by the new manager
    assert all(i.valid for i in infos), [i.problem for i in infos if not i.valid]
    steps = [i.step for i in infos]
    assert set(committed) <= set(steps), (committed, steps)
    mgr = CheckpointManager(directory, keep_last=None)
    for s in steps:
        state = {"w": None, "n": None}
        assert mgr.restore(state, s) == s
        assert state["n"] == s and state["w"].shape == (2_500_000,) and bool((state["w"] == s).all())
    return steps


# kill right before: the first write of a file, a write inside a tensor file, an fsync of a data
# file, the manifest's fsync, the commit rename, and the parent directory's fsync after the rename
KILL_POINTS = ["write:1", "write:3", "fsync:2", "fsync:5", "rename:1", "fsync:7"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_kill_points_leaves_earlier_checkpoints_intact(tmp_path, point):
    pre = CheckpointManager(tmp_path, keep_last=None, async_save=False)
    w = torch.empty(2_500_000)
    for s in (0, 1):
        w.fill_(s)
        pre.save({"w": w, "n": s}, s)
    fn_name, n = point.split(":")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: one more committed save, then kill itself at the chosen call
        try:
            os.close(read_fd)
            torch.set_num_threads(1)
            mgr = CheckpointManager(tmp_path, keep_last=None, async_save=point.startswith("write"))
            w.numpy().fill(2)
            mgr.save({"w": w, "n": 2}, 2)
            mgr.wait()
            os.write(write_fd, b"2\n")
            real, calls = getattr(os, fn_name), [0]

            def wrapper(*a, **k):
                calls[0] += 1
                if calls[0] == int(n):
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*a, **k)

            setattr(os, fn_name, wrapper)
            w.numpy().fill(3)
            mgr.save({"w": w, "n": 3}, 3)
            mgr.wait()
            os.write(write_fd, b"3\n")
        finally:
            os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("child did not finish")
        time.sleep(0.01)
    committed = [0, 1] + [int(x) for x in os.read(read_fd, 100).split()]
    os.close(read_fd)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the kill point was not reached"
    steps = _check_after_kill(tmp_path, committed)
    assert 2 in committed and steps[: 3] == [0, 1, 2]
    assert (3 in steps) == (point == "fsync:7")  # only a kill after the rename keeps step 3


def test_sigkill_at_random_moments(tmp_path):
    rng = random.Random(4)
    committed = []
    for round_ in range(2):
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        proc = subprocess.Popen([sys.executable, WORKER, "spam", str(tmp_path), "1000", "async"], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()  # the child is saving once it reports its first commit
            assert first.startswith("committed"), first
            time.sleep(rng.uniform(0.05, 0.6))
            proc.send_signal(signal.SIGKILL)
            out = first + proc.communicate(timeout=60)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        committed += [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]
        _check_after_kill(tmp_path, committed)


def test_interpreter_exit_waits_for_pending_write(tmp_path):
    r = run_worker("atexit", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "returned" in r.stdout
    infos = CheckpointManager(tmp_path).list(verify=True)
    assert [(i.step, i.valid) for i in infos] == [(7, True)]


# --------------------------------------------------------------------------------------------------
# async behaviour and failures

class SlowWriter:
    """Wraps write_safetensors: sleeps first, tracks how many writes run at once, can fail."""

    def __init__(self, monkeypatch, delay=0.0, fail_with=None):
        self.real = _format.write_safetensors
        self.delay, self.fail_with = delay, fail_with
        self.active = self.max_active = 0
        monkeypatch.setattr(writer_mod, "write_safetensors", self)

    def __call__(self, *args, **kwargs):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            if self.fail_with is not None:
                raise self.fail_with
            return self.real(*args, **kwargs)
        finally:
            self.active -= 1


def test_async_save_snapshots_then_writes_in_background(tmp_path, monkeypatch):
    writer = SlowWriter(monkeypatch, delay=0.4)
    model = small_model()
    mgr = CheckpointManager(tmp_path, keep_last=None)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    mgr.save({"model": model}, 1)
    assert time.perf_counter() - t0 < 0.4  # returned before the (slowed) write
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3)  # training goes on while the write runs
    ptrs = sorted(b.data_ptr() for b in mgr._pool._bufs.values())
    mgr.save({"model": model}, 2)  # waits for step 1, then reuses the same host buffers
    assert sorted(b.data_ptr() for b in mgr._pool._bufs.values()) == ptrs
    mgr.save({"model": model}, 3)
    mgr.wait()
    assert writer.max_active == 1
    restored = small_model(7)
    mgr.restore({"model": restored}, 1)
    same(saved, dict(restored.state_dict()))
    assert [i.step for i in mgr.list(verify=True)] == [1, 2, 3]


@pytest.mark.parametrize("async_save", [True, False])
def test_write_error_is_raised_and_loses_nothing(tmp_path, monkeypatch, async_save):
    mgr = CheckpointManager(tmp_path, async_save=async_save)
    mgr.save({"w": torch.ones(10)}, 1)
    mgr.wait()
    writer = SlowWriter(monkeypatch, fail_with=OSError(errno.EIO, "Input/output error"))
    if async_save:
        mgr.save({"w": torch.ones(10)}, 2)  # the error surfaces at the next call
        with pytest.raises(CheckpointError, match="Input/output error"):
            mgr.wait()
        mgr.save({"w": torch.ones(10)}, 3)
        with pytest.raises(CheckpointError, match="step 3"):
            mgr.save({"w": torch.ones(10)}, 4)  # raises the pending error of step 3, saves nothing
    else:
        with pytest.raises(CheckpointError, match="Input/output error"):
            mgr.save({"w": torch.ones(10)}, 2)
    writer.fail_with = None
    mgr.save({"w": torch.full((10,), 5.0)}, 5)
    mgr.wait()
    assert [i.step for i in mgr.list(verify=True)] == [1, 5]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def _fail_writes_after(monkeypatch, budget):
    """os.write raises ENOSPC once ``budget`` more bytes have been written (a full disk)."""
    real = os.write
    left = [budget]

    def write(fd, data):
        n = len(memoryview(data))
        if n > left[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= n
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("async_save", [True, False])
def test_full_disk_simulated(tmp_path, monkeypatch, async_save):
    mgr = CheckpointManager(tmp_path, async_save=async_save)
    mgr.save({"w": torch.ones(1000)}, 1)
    mgr.wait()
    _fail_writes_after(monkeypatch, 20_000)
    with pytest.raises(CheckpointError, match="No space left on device"):
        mgr.save({"w": torch.ones(100_000)}, 2)
        mgr.wait()
    monkeypatch.undo()
    state = {"w": None}
    assert mgr.restore(state) == 1 and torch.equal(state["w"], torch.ones(1000))
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"]


def test_full_disk_real_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        mgr = CheckpointManager(mnt, keep_last=None, async_save=False)
        mgr.save({"w": torch.ones(1000)}, 1)
        with pytest.raises(CheckpointError, match="No space left on device"):
            mgr.save({"w": torch.ones(1_000_000)}, 2)
        state = {"w": None}
        assert mgr.restore(state) == 1 and torch.equal(state["w"], torch.ones(1000))
        assert sorted(os.listdir(mnt)) == ["step_00000001"]
        mgr.save({"w": torch.ones(1000)}, 3)  # the failed attempt's space was freed
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_unwritable_directory(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, async_save=False)
    mgr.save({"n": 1}, 1)
    if os.geteuid() != 0:
        os.chmod(tmp_path, 0o555)
    else:  # root ignores permission bits: deny the way the kernel would
        real = os.makedirs

        def makedirs(path, *a, **k):
            if ".tmp-" in os.fspath(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return real(path, *a, **k)

        monkeypatch.setattr(os, "makedirs", makedirs)
    try:
        with pytest.raises(CheckpointError, match="Permission denied"):
            mgr.save({"n": 2}, 2)
    finally:
        os.chmod(tmp_path, 0o755)
    state = {"n": None}
    assert mgr.restore(state) == 1 and state["n"] == 1


# --------------------------------------------------------------------------------------------------
# retention

def expected_kept(history, keep_last, keep_best, mode):
    steps = [s for s, _ in history]
    keep = set(steps[-keep_last:]) if keep_last else {steps[-1]}  # the one just written always stays
    scored = sorted((m if mode == "min" else -m, -s) for s, m in history if m is not None)
    keep |= {-neg_s for _, neg_s in scored[:keep_best]}
    return sorted(keep)


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("keep_last,keep_best", [(2, 1), (3, 2), (1, 0), (0, 2)])
def test_retention_keep_last_plus_best(tmp_path, mode, keep_last, keep_best):
    rng = random.Random(keep_last * 10 + keep_best)
    mgr = CheckpointManager(tmp_path, keep_last=keep_last, keep_best=keep_best, metric="val", mode=mode,
                            async_save=False, rng=False)
    history = []
    for step in range(0, 45, 5):
        m = None if step == 15 else rng.uniform(0, 10)
        mgr.save({"n": step}, step, None if m is None else {"val": m, "other": 1})
        history.append((step, m))
        assert [i.step for i in mgr.list()] == expected_kept(history, keep_last, keep_best, mode)
    if keep_best:
        state = {"n": None}
        best = min((m if mode == "min" else -m, s) for s, m in history if m is not None)[1]
        assert mgr.restore(state, "best") == best and state["n"] == best


def test_retention_never_deletes_the_restored_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, async_save=False)
    for s in (1, 2):
        mgr.save({"n": s}, s)
    mgr.restore({"n": None}, 1)
    mgr.save({"n": 3}, 3)
    mgr.save({"n": 4}, 4)
    assert [i.step for i in mgr.list()] == [1, 3, 4]


# --------------------------------------------------------------------------------------------------
# exact resume and distributed

def test_exact_resume_after_sigkill_is_bitwise_equal(tmp_path):
    total, every, kill_at = 60, 7, 47
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    full = subprocess.Popen([sys.executable, WORKER, "train", str(tmp_path / "full"), str(total), str(every), "-1",
                             str(tmp_path / "full.st")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # the uninterrupted run, alongside
    killed = run_worker("train", tmp_path / "run", total, every, kill_at, tmp_path / "never.st")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    latest = max(i.step for i in CheckpointManager(tmp_path / "run").list() if i.valid)
    assert 0 < latest <= kill_at
    resumed = run_worker("train", tmp_path / "run", total, every, -1, tmp_path / "resumed.st")
    assert resumed.returncode == 0, resumed.stderr
    assert f"start {latest}" in resumed.stdout
    out, err = full.communicate(timeout=120)
    assert full.returncode == 0, err
    a, _ = _format.read_safetensors(str(tmp_path / "full.st"))
    b, _ = _format.read_safetensors(str(tmp_path / "resumed.st"))
    assert list(a) == list(b) and len(a) == 4
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_distributed_two_ranks_save_and_restore_the_same_step(tmp_path):
    res = run_ranks([WORKER, "dist", "{rank}", "2", "{port}", str(tmp_path)], world=2, timeout_s=120,
                    torchrun_env=False)
    for code, _, err in res:
        assert code == 0, err
    res = [json.load(open(tmp_path / f"result_{r}.json")) for r in range(2)]
    expected_files = ["manifest.json", "model.safetensors", "opt.safetensors", "rank_00000.json",
                      "rank_00000.safetensors", "rank_00001.json", "rank_00001.safetensors", "state.json"]
    for r, x in enumerate(res):
        assert x["files"] == expected_files  # replicated state once, per-rank state per rank
        assert x["restored"] == 1 and x["all_restored"] == [1, 1], x  # rank 1's newest file was corrupt
        assert x["warned"] and x["model_ok"] and x["rng_ok"] and x["epoch"] == 5
        assert x["loader"] == x["saved_loader"] == {"epoch": 0, "pos": r + 1}
    manifest = json.load(open(tmp_path / "step_00000001" / "manifest.json"))
    assert manifest["world_size"] == 2


# --------------------------------------------------------------------------------------------------
# warm start

def test_load_weights_warm_start(tmp_path):
    model = small_model(0)
    opt = tp.FusedAdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 3, seed=0)
    mgr = CheckpointManager(tmp_path, async_save=False)
    mgr.save({"model": model, "opt": opt, "teacher": small_model(1)}, 3)
    new = small_model(5)
    new.append(torch.nn.Linear(3, 8))  # a new head on top of the saved body
    head = {k: v.clone() for k, v in new[4].state_dict().items()}
    with pytest.raises(ValueError, match="pass key="):
        mgr.load_weights(new)
    missing = r"entry 'model' does not fit Sequential: missing keys \['4.weight', '4.bias'\]$"
    with pytest.raises(RuntimeError, match=missing):  # a RuntimeError still, as torch's own error was
        mgr.load_weights(new, key="model")
    result = mgr.load_weights(new, key="model", strict=False)
    assert sorted(result.missing_keys) == ["4.bias", "4.weight"] and result.unexpected_keys == []
    for k, v in model.state_dict().items():
        assert torch.equal(new.state_dict()[k], v)
    same(head, dict(new[4].state_dict()))
    plain = small_model(6)
    load_weights(plain, tmp_path / "step_00000003" / "model.safetensors")
    same(dict(model.state_dict()), dict(plain.state_dict()))
    with pytest.raises(ValueError, match="no entry"):
        load_weights(plain, tmp_path / "step_00000003", key="nope")


# --------------------------------------------------------------------------------------------------
# virtual epochs

@pytest.mark.parametrize("n,b,stop,k", [(1000, 10, 3.0, 30), (10007, 33, 14.3, 15), (503, 7, 0.5, 4), (64, 64, 1, 1)])
def test_virtual_epochs_plan(n, b, stop, k):
    plan = VirtualEpochs(n, b, stop, k)
    spe = int(stop * n) // (b * k)
    assert plan.steps_per_epoch == spe and plan.total_steps == spe * k and len(plan) == k
    seen = []
    for i, epoch in enumerate(plan):
        assert epoch.index == i and (epoch.start_step, epoch.stop_step) == (i * spe, (i + 1) * spe)
        seen.append(list(epoch))
    assert seen == [list(range(i * spe, (i + 1) * spe)) for i in range(k)]
    assert plan.step == plan.total_steps and plan.remaining_steps == 0 and list(plan) == []


def test_virtual_epochs_resume_mid_epoch_and_growth(tmp_path):
    plan = VirtualEpochs(10000, 10, 3.0, 30)  # 30000 examples: 100 steps per virtual epoch, 3000 steps
    mgr = CheckpointManager(tmp_path, async_save=False, rng=False)
    for epoch in plan:
        for step in epoch:
            if step == 1049:  # checkpoint in the body of step 1049: 1050 steps done
                mgr.save({"plan": plan}, plan.step)
                break
        if plan.step == 1050:
            break
    resumed = VirtualEpochs(10000, 10, 3.0, 30)
    mgr.restore({"plan": resumed})
    epochs = [(e.index, list(e)) for e in resumed]
    assert epochs[0] == (10, list(range(1050, 1100))) and epochs[1][0] == 11
    assert sum(len(s) for _, s in epochs) == 3000 - 1050

    grown = VirtualEpochs(15010, 10, 3.0, 30)  # 1.5x the data: budget 45030 examples
    mgr.restore({"plan": grown})
    extra = (int(3.0 * 15010) - int(3.0 * 10000)) // (10 * 100)
    assert extra == 15
    assert grown.steps_per_epoch == 100 and grown.step == 1050  # cadence and progress kept
    assert grown.num_epochs == 30 + extra and grown.total_steps == (30 + extra) * 100
    assert grown.remaining_steps == grown.total_steps - 1050
    shrunk = VirtualEpochs(2000, 10, 3.0, 30)
    mgr.restore({"plan": shrunk})
    assert shrunk.num_epochs == 11 and shrunk.step == 1050  # never below what was trained
    with pytest.raises(ValueError, match="batch_size"):
        VirtualEpochs(10000, 20, 3.0, 30).load_state_dict(plan.state_dict())


def test_virtual_epochs_bad_input():
    for args in [(0, 1, 1.0, 1), (10, 0, 1.0, 1), (10, 1, 0.0, 1), (10, 1, float("nan"), 1), (10, 1, 1.0, 0),
                 (10.5, 1, 1.0, 1), (10, 3, 1.0, 4)]:
        with pytest.raises(ValueError):
            VirtualEpochs(*args)


# --------------------------------------------------------------------------------------------------
# bad input

def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="keep_best"):
        CheckpointManager(tmp_path, keep_best=2)
    with pytest.raises(ValueError, match="mode"):
        CheckpointManager(tmp_path, mode="lowest")
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=-1)
    mgr = CheckpointManager(tmp_path, async_save=False)
    with pytest.raises(ValueError, match="step"):
        mgr.save({"n": 1}, -1)
    with pytest.raises(TypeError, match="state must be a dict"):
        mgr.save([1], 1)
    with pytest.raises(TypeError, match=r"state\['f'\]\[0\]: cannot save a value of type function"):
        mgr.save({"f": [lambda: 0]}, 1)
    with pytest.raises(TypeError, match="complex"):
        mgr.save({"z": torch.zeros(2, dtype=torch.complex64)}, 1)
    with pytest.raises(TypeError, match="metric 'loss' must be a number"):
        mgr.save({"n": 1}, 1, {"loss": "low"})
    mgr.save({"n": 1}, 1)
    with pytest.raises(CheckpointError, match="already exists"):
        mgr.save({"n": 1}, 1)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        mgr.restore({"n": 1}, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="metric"):
        mgr.restore({"n": 1}, "best")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_nan_metric_is_kept_but_never_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1, keep_best=1, metric="loss", async_save=False)
    mgr.save({"n": 1}, 1, {"loss": 0.5})
    mgr.save({"n": 2}, 2, {"loss": float("nan")})
    mgr.save({"n": 3}, 3, {"loss": np.float32(0.7)})
    infos = {i.step: i.metrics["loss"] for i in mgr.list()}
    assert sorted(infos) == [1, 3] and infos[1] == 0.5 and infos[3] == pytest.approx(0.7)
    mgr2 = CheckpointManager(tmp_path / "b", keep_last=2, async_save=False)
    mgr2.save({"n": 1}, 1, {"loss": float("nan"), "acc": float("-inf")})
    m = mgr2.list()[0].metrics
    assert math.isnan(m["loss"]) and m["acc"] == float("-inf")


def test_crc_matches_zlib():
    import zlib

    rng = np.random.default_rng(0)
    for n in (0, 1, 4095, 5 * 1024 + 3, 1 << 20):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _format.crc32(data) == zlib.crc32(data)
        assert _format.crc32(data, 0x12345678) == zlib.crc32(data, 0x12345678)
    c = _format.Crc32()
    pieces = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (7, 100_000, 3)]
    for p in pieces:
        c.update(p)
    assert c.value() == zlib.crc32(b"".join(pieces))


def test_virtual_epochs_accepts_numpy_integers():
    plan = VirtualEpochs(np.int64(1000), np.int32(10), np.float64(2.5), np.int64(5))
    assert plan.steps_per_epoch == 2500 // 50 and isinstance(plan.total_steps, int)


def test_a_corrupt_checkpoint_is_moved_aside_when_its_step_comes_again(tmp_path):
    mgr, weights = _three_checkpoints(tmp_path)
    flip_byte(tmp_path / "step_00000003" / "manifest.json", 40)
    model = small_model(9)
    state = {"model": model, "opt": tp.FusedAdamW(model.parameters(), lr=1e-2), "loader": Holder()}
    with pytest.warns(RuntimeWarning):
        assert mgr.restore(state) == 2
    with pytest.warns(RuntimeWarning, match="replacing the unusable checkpoint"):
        mgr.save(state, 3)
    aside = [n for n in os.listdir(tmp_path) if ".corrupt-" in n]
    assert len(aside) == 1 and aside[0].startswith("step_00000003")
    assert [i.step for i in mgr.list(verify=True)] == [1, 2, 3]
    with pytest.raises(CheckpointError, match="already exists"):
        mgr.save(state, 3)  # a good one is never overwritten


def test_restore_never_unpickles(tmp_path, monkeypatch):
    import pickle

    model = small_model()
    opt = tp.FusedAdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 2, seed=0)
    mgr = CheckpointManager(tmp_path, async_save=False)
    mgr.save({"model": model, "opt": opt, "loader": Holder({"pos": 3})}, 1)

    def refuse(*a, **k):
        raise AssertionError("restore tried to unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model2 = small_model(4)
    opt2 = tp.FusedAdamW(model2.parameters(), lr=1e-2)
    assert mgr.restore({"model": model2, "opt": opt2, "loader": Holder()}) == 1
    same(dict(model.state_dict()), dict(model2.state_dict()))
    same(opt.state_dict(), opt2.state_dict())
