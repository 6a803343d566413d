"""Copies and reads split over threads: the snapshot of an async save and the read of a restore.

A snapshot copies its large CPU tensors in one pass split over a few threads, and a restore reads
each file as a few contiguous shares at once, one CRC-32 per share, joined by ``crc32_combine``.
References: zlib's CRC of the whole byte string, the tensors the files were written from (compared
byte for byte, so NaN payloads count), and the state as it was when ``save`` returned.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import trainpatterns as tp
from trainpatterns.checkpoint import CheckpointError, CheckpointManager
from trainpatterns.checkpoint._format import checksum, read_safetensors, threads, write_safetensors

PYTHON_DIR = str(Path(tp.__file__).resolve().parent.parent)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8,
          torch.bool]
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def random_tensor(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Every bit pattern, NaNs included: random bytes seen as ``dtype``."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return (raw & 1).bool() if dtype == torch.bool else raw.view(dtype)


def bump(t: torch.Tensor) -> None:
    """Change one element in place (as a training step would)."""
    if t.numel():
        i = (0,) * t.dim()
        t[i] = ~t[i] if t.dtype == torch.bool else (7 if t[i] != 7 else 8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    yield
    torch.set_num_threads(old)


def split_witness(real):
    """``(wrapper, threads)``: ``wrapper`` calls ``real`` and adds the calling thread to ``threads``.
    The test's own thread, on its first call, waits (up to 10 s) until another thread has called it:
    on a busy machine the caller could otherwise take every piece of a split before a helper wakes,
    and a split would look like no split."""
    main, threads, other, waited = threading.get_ident(), set(), threading.Event(), []

    def wrapper(*args, **kw):
        me = threading.get_ident()
        threads.add(me)
        if me != main:
            other.set()
        elif not waited:
            waited.append(True)
            other.wait(10.0)
        return real(*args, **kw)
    return wrapper, threads


@pytest.fixture
def many_shares(monkeypatch):
    """Chunks of 4 KiB shared by 4 threads: chunk boundaries fall inside tensors."""
    monkeypatch.setattr(threads, "CHUNK", 4096)
    old = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------------
# pieces

@settings(max_examples=200, deadline=None)
@given(hs.binary(max_size=3000), hs.binary(max_size=3000), hs.integers(0, (1 << 32) - 1))
def test_crc32_combine_is_the_crc_of_the_concatenation(a, b, seed):
    want = zlib.crc32(a + b, seed)
    for combine in (checksum.crc32_combine, checksum._crc32_combine):
        assert combine(zlib.crc32(a, seed), zlib.crc32(b), len(b)) == want


def test_crc32_combine_over_long_ranges():
    rng = np.random.default_rng(0)
    a, b = rng.bytes(5 << 20), rng.bytes((3 << 20) + 7)
    for combine in (checksum.crc32_combine, checksum._crc32_combine):
        assert combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@settings(max_examples=300, deadline=None)
@given(hs.lists(hs.integers(0, 5000), max_size=30), hs.integers(1, 8))
def test_split_ranges_tile_every_buffer_in_order_in_near_equal_shares(sizes, parts):
    shares = threads.split_ranges(sizes, parts)
    assert len(shares) == parts
    flat = [piece for share in shares for piece in share]
    covered = [(i, a) for i, a, b in flat for a in range(a, b)] if sum(sizes) < 20000 else None
    if covered is not None:
        assert covered == [(i, a) for i, n in enumerate(sizes) for a in range(n)]
    assert all(a < b for _, a, b in flat)
    lengths = [sum(b - a for _, a, b in share) for share in shares]
    assert sum(lengths) == sum(sizes) and max(lengths) - min(lengths) <= 1


def test_run_split_waits_for_every_started_job_before_raising(two_threads):
    done = threading.Event()

    def slow():
        time.sleep(0.3)
        done.set()

    def failing():
        raise ValueError("one job failed")

    with pytest.raises(ValueError, match="one job failed"):
        threads.run_split([slow, failing])  # whichever thread takes the slow one, it is waited for
    assert done.is_set(), "run_split returned while a job still ran"
    started = []
    with pytest.raises(KeyError):
        threads.run_split([lambda: started.append(1) or time.sleep(0.2), lambda: {}["missing"]]
                          + [lambda: started.append(2)] * 50)
    assert len(started) < 51, "jobs kept starting after an error"
    assert threads.run_split([lambda i=i: i * i for i in range(100)]) == [i * i for i in range(100)]


# --------------------------------------------------------------------------------------------------
# the read of a restore

@SETTINGS
@given(hs.lists(hs.tuples(hs.integers(0, 40_000), hs.sampled_from(DTYPES)), min_size=1, max_size=6),
       hs.booleans(), hs.integers(0, 10**6))
def test_split_read_returns_the_exact_tensors_and_checks_every_share(tmp_path, many_shares, specs, copy, seed):
    tensors = {f"t{i}": random_tensor(n, dt, seed + i) for i, (n, dt) in enumerate(specs)}
    path = os.path.join(tempfile.mkdtemp(dir=tmp_path), "f.safetensors")
    size, crc = write_safetensors(path, tensors, {"k": "v"})
    got, meta = read_safetensors(path, (size, crc), copy=copy)
    assert meta == {"k": "v"} and set(got) == set(tensors)
    for name, t in tensors.items():
        assert same_bytes(got[name], t), name
    data = bytearray(open(path, "rb").read())
    header = 8 + int.from_bytes(data[:8], "little")
    if len(data) > header:  # damage one byte of the tensor data, anywhere: some share must see it
        data[header + seed % (len(data) - header)] ^= 0x40
        os.remove(path)
        with open(path, "wb") as f:
            f.write(data)
        with pytest.raises(CheckpointError, match="fails its checksum"):
            read_safetensors(path, (size, crc), copy=copy)
    os.remove(path)


def test_a_large_read_is_split_over_threads(tmp_path, monkeypatch, two_threads):
    t = random_tensor(3 * threads.CHUNK // 4, torch.float32, 1)  # 3 chunks
    path = str(tmp_path / "big.safetensors")
    expected = write_safetensors(path, {"t": t, "small": torch.arange(5)}, {})
    preadv, readers = split_witness(os.preadv)
    monkeypatch.setattr(os, "preadv", preadv)
    got, _ = read_safetensors(path, expected)
    assert same_bytes(got["t"], t) and torch.equal(got["small"], torch.arange(5))
    assert len(readers) >= 2, "the read ran on one thread"


def test_short_reads_truncation_and_growth_while_reading(tmp_path, many_shares, monkeypatch):
    tensors = {"a": random_tensor(100_003, torch.float32, 2), "b": random_tensor(7, torch.int64, 3)}
    path = str(tmp_path / "f.safetensors")
    expected = write_safetensors(path, tensors, {})
    real = os.preadv

    def short(fd, bufs, pos):  # the kernel may return fewer bytes than asked: at most 999 here
        return real(fd, [memoryview(bufs[0])[:999]], pos)

    monkeypatch.setattr(os, "preadv", short)
    got, _ = read_safetensors(path, expected)
    assert all(same_bytes(got[k], v) for k, v in tensors.items())

    def truncating(fd, bufs, pos):
        os.truncate(path, 1000)
        return real(fd, bufs, pos)

    monkeypatch.setattr(os, "preadv", truncating)
    with pytest.raises(CheckpointError, match="truncated while being read"):
        read_safetensors(path)
    monkeypatch.setattr(os, "preadv", real)
    os.remove(path)
    expected = write_safetensors(path, tensors, {})

    def growing(fd, bufs, pos):
        with open(path, "ab") as f:
            f.write(b"x")
        return real(fd, bufs, pos)

    monkeypatch.setattr(os, "preadv", growing)
    with pytest.raises(CheckpointError, match="grew while it was being read"):
        read_safetensors(path)


# --------------------------------------------------------------------------------------------------
# the snapshot of an async save

def odd_state() -> dict:
    """Tensors large enough for the split copy beside small, empty, strided and tied ones."""
    big = random_tensor(278_011, torch.float32, 4).view(-1)
    w = torch.randn(300, 257)
    return {"big": big, "big_again": big, "bf16": random_tensor(100_001, torch.bfloat16, 5),
            "mask": random_tensor(70_000, torch.bool, 6), "ids": random_tensor(20_000, torch.int64, 7),
            "wT": w.t(), "small": torch.randn(3), "empty": torch.empty(0, 4), "bytes": random_tensor(65_536,
                                                                                                    torch.uint8, 8)}


def test_async_snapshot_is_the_state_at_save_split_over_threads(tmp_path, monkeypatch, two_threads):
    copyto, copiers = split_witness(np.copyto)
    monkeypatch.setattr(np, "copyto", copyto)
    value = odd_state()
    value["fill"] = torch.randn(threads.CHUNK)  # 4 chunks
    saved = {k: v.clone() for k, v in value.items()}
    mgr = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2):  # the second save reuses the host buffers of the first
        mgr.save({"v": value}, step)
        for t in value.values():  # training goes on while the write runs
            bump(t)
        mgr.wait()
        state = {"v": None}
        assert mgr.restore(state, step) == step
        for k, t in saved.items():
            assert same_bytes(state["v"][k], t), (step, k)
        assert state["v"]["big"] is state["v"]["big_again"]
        saved = {k: v.clone() for k, v in value.items()}
    assert len(copiers) >= 2, "the snapshot copy ran on one thread"


@SETTINGS
@given(hs.lists(hs.tuples(hs.integers(0, 300_000), hs.sampled_from(DTYPES)), min_size=1, max_size=5),
       hs.integers(0, 10**6))
def test_property_async_snapshot_and_split_restore_round_trip(tmp_path, many_shares, specs, seed):
    value = [random_tensor(n, dt, seed + i) for i, (n, dt) in enumerate(specs)]
    saved = [t.clone() for t in value]
    d = tempfile.mkdtemp(dir=tmp_path)
    mgr = CheckpointManager(d, keep_last=None, rng=False)
    mgr.save({"v": value}, 1)
    for t in value:
        bump(t)
    mgr.wait()
    state = {"v": None}
    mgr.restore(state)
    assert len(state["v"]) == len(saved) and all(same_bytes(g, t) for g, t in zip(state["v"], saved))


def test_a_forked_child_saves_and_restores_with_its_own_threads(tmp_path):
    """The parent's helper threads do not exist in a forked child: it must start its own (no hang)."""
    script = f"""
import os, sys, torch
from trainpatterns.checkpoint import CheckpointManager
from trainpatterns.checkpoint._format import threads
threads.CHUNK = 1 << 16
torch.set_num_threads(2)
w = torch.randn(600_000)
w2 = w * 2  # no torch kernel in the child: OpenMP's threads do not survive a fork either
mgr = CheckpointManager({str(tmp_path)!r}, keep_last=None)
mgr.save({{"w": w}}, 1); mgr.wait()
pid = os.fork()
if pid == 0:
    try:
        child = CheckpointManager({str(tmp_path)!r}, keep_last=None)
        child.save({{"w": w2}}, 2); child.wait()
        s = {{"w": None}}
        child.restore(s, 2)
        os._exit(0 if (s["w"].numpy().view("u4") == w2.numpy().view("u4")).all() else 3)
    finally:
        os._exit(4)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=PYTHON_DIR))
    assert proc.returncode == 0 and proc.stdout.strip() == "child 0", (proc.stdout, proc.stderr[-2000:])
