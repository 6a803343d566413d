"""Faults at the native boundary: tensors changed behind a cached table, storages resized under a
tensor, lazy views, loader sources freed or truncated while gather threads read them. Each used to
end the process with SIGSEGV or SIGBUS, or to give a wrong answer; now each is a clear exception
or the right answer. (Batch buffers sized by batch_size rather than the data: tests/test_data.py.)

Anything that could crash runs in a child process (tests/_native_fault_worker.py), many cases to a
process; a child that dies by a signal is reported with the case it was running. The random
scenarios are drawn by hypothesis inside the child (a fixed seed here, more seeds under -m slow).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trainpatterns as tp
from trainpatterns import _kernels

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "_native_fault_worker.py")
PYTHON_DIR = str(Path(tp.__file__).resolve().parent.parent)  # the child imports the same build


def run_worker(*args: str, timeout: float = 240, reader: str = "native") -> tuple[int, list, str]:
    """(exit code, [(tag, value)] of its protocol lines, full output) of one child, whose
    optimizers read tensors with the native reader or the Python fallback (``reader``)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PYTHON_DIR, str(HERE), os.environ.get("PYTHONPATH", "")]),
               TP_TENSOR_READER=reader)
    res = subprocess.run([sys.executable, WORKER, *args], env=env, capture_output=True, text=True, timeout=timeout,
                         cwd=HERE)
    lines = []
    for line in res.stdout.splitlines():
        tag, _, rest = line.partition(" ")
        if tag in ("start", "done", "summary"):
            lines.append((tag, json.loads(rest)))
    return res.returncode, lines, res.stdout + res.stderr


def death(rc: int, lines: list, output: str) -> str:
    """What to say about a child that did not finish: the signal and the case it was running."""
    started = [v for tag, v in lines if tag == "start"]
    how = f"died by {signal.Signals(-rc).name}" if rc < 0 else f"exited with {rc}"
    return f"the worker {how} on case {started[-1] if started else None}\n{output[-4000:]}"


# --------------------------------------------------------------------------------------------------
# the faults of the issue, one deterministic case each

CASES = ["param_shrunk_in_place", "param_storage_resized", "grad_storage_resized", "grad_storage_shrunk_persistent",
         "neg_view_gradient", "loader_tensor_resized", "loader_memmap_truncated"]


@pytest.fixture(scope="module")
def case_results(tmp_path_factory) -> dict:
    """{case: what it returned or raised, or how the process died}, every case run once; a child
    that dies is restarted with the cases after the one that killed it."""
    tmp = str(tmp_path_factory.mktemp("native_faults"))
    results, todo = {}, list(CASES)
    while todo:
        rc, lines, output = run_worker("cases", tmp, *todo)
        for tag, value in lines:
            if tag == "done":
                results[value["case"]] = value
        started = [v for tag, v in lines if tag == "start"]
        if rc != 0:
            if not started or started[-1] in results:
                raise AssertionError(death(rc, lines, output))
            results[started[-1]] = {"died": death(rc, lines, output)}
        todo = todo[len(started):] if rc != 0 else []
    return results


def outcome(results: dict, case: str) -> dict:
    got = results[case]
    assert "died" not in got, got["died"]
    return got


@pytest.mark.parametrize("case,error,words", [
    ("param_shrunk_in_place", "ValueError", "state['exp_avg'] has shape (1048576,) but the parameter has shape (10,)"),
    ("param_storage_resized", "ValueError", "its storage holds 0 bytes but the tensor needs 4194304"),
    ("grad_storage_resized", "ValueError", "its storage holds 16 bytes but the tensor needs 4194304"),
    ("grad_storage_shrunk_persistent", "ValueError", "gradient shape (100,) does not match parameter shape"),
    ("neg_view_gradient", "ValueError", "lazy negated view"),
    ("loader_memmap_truncated", "RuntimeError", "was it truncated while the loader ran?"),
])
def test_fault_is_a_clear_error(case_results, case, error, words):
    got = outcome(case_results, case)
    assert got.get("error") == error and words in got["message"], got


def test_loader_source_storage_cannot_be_freed_under_the_threads(case_results):
    """resize_ on a source tensor's storage is refused (it would free memory the threads read) and
    every batch equals the reference gathered from a copy taken before."""
    got = outcome(case_results, "loader_tensor_resized")["result"]
    assert "not resizable" in got["refused"] and got["batches_equal_reference"], got


# --------------------------------------------------------------------------------------------------
# random scenarios

def _fuzz(*args: str, reader: str = "native") -> dict:
    rc, lines, output = run_worker(*args, reader=reader)
    assert rc == 0, death(rc, lines, output)
    return [v for tag, v in lines if tag == "summary"][0]


@pytest.mark.parametrize("reader,n", [("native", "300"), ("python", "100")])
def test_optimizers_survive_random_faults(reader, n):
    """FusedAdamW/Adam/SGD/Adagrad in fp32/fp64/bf16/fp16 over random shapes, layouts (slices with
    a storage offset, transposed, expanded), gradients (fresh, persistent, absent, offset), storage
    swaps, shrinks, storage resizes and lazy views between steps: every step either equals
    torch.optim's or is refused with an exception before it changes anything; with each way the
    per-step check reads tensors."""
    counts = _fuzz("optim", "0", n, reader=reader)
    assert counts.get("ok", 0) > 20 and counts.get("refused", 0) > 20, counts


def test_loader_survives_random_faults(tmp_path):
    """Random sources (numpy, torch, memmap, numpy views of torch memory; every dtype), row counts,
    batch sizes up to 2**40, threads and prefetch, with the source tensor swapped or resized during
    an epoch and memmap files truncated between epochs: batches equal the reference, or the loader
    raises."""
    counts = _fuzz("loader", str(tmp_path), "0", "150")
    assert counts.get("ok", 0) > 50, counts


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_faults_long(tmp_path, seed):
    _fuzz("optim", str(seed), "3000")
    _fuzz("loader", str(tmp_path), str(seed), "1000")


# --------------------------------------------------------------------------------------------------
# the native tensor reader (in process: it only reads metadata)

def _tensor(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                                  torch.bool]))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    n = int(np.prod(shape)) if shape else 1
    base = torch.zeros(n + 5, dtype=dtype)
    off = draw(st.integers(0, 5))
    t = base[off:off + n].view(shape)
    view = draw(st.sampled_from(["plain", "transposed", "neg", "expanded", "parameter"]))
    if view == "transposed" and t.dim() >= 2:
        t = t.transpose(0, -1)
    elif view == "neg" and dtype.is_floating_point:
        t = torch._neg_view(t)
    elif view == "expanded" and t.dim() >= 1:
        t = t.reshape(-1)[:1].expand(3, *t.shape[1:]) if t.numel() else t
    elif view == "parameter" and dtype.is_floating_point:
        t = torch.nn.Parameter(t)
    resize = draw(st.sampled_from([None, None, 0, 4, 1000]))
    if resize is not None:
        t.untyped_storage().resize_(resize)  # metadata stays; the storage no longer holds it
    return t


def test_native_reader_is_in_use():
    """This torch exports what the native reader needs; without it every optimizer step would read
    each tensor through Python (correct, but far slower on many small tensors)."""
    assert _kernels.set_tensor_reader(True)
    assert tp.build_info()["tensor_reader"] == "torch C functions"


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_native_reader_agrees_with_python(data):
    """Whatever tensor it is given (views with an offset, transposed, expanded, lazy negated,
    parameters, every dtype, storages resized under them), the native reader reads what the tensor
    says of itself: address, element count, dtype, contiguity, whether its storage holds it,
    device, lazy-view bit."""
    t = _tensor(data.draw)
    assert _kernels.read_tensor(t) == _kernels.tensor_facts(t)
    assert _kernels.read_tensor("not a tensor") is None
