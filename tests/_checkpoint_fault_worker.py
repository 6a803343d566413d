"""Child processes for tests/test_checkpoint_faults.py, so that a crash (a signal) is seen as one.

Modes (argv[1]):
  serve DIR      writes two real checkpoints (steps 1 and 2) into DIR, remembering the
      exact state each holds, prints "ready", then for each line on stdin (a directory holding a
      copy of them, damaged by the test) restores it into fresh objects and prints one JSON line:
      {"step", "warnings", "problems"}. problems lists every way the outcome broke the contract:
      the restore must return step 2 with exactly step 2's state, or step 1 with exactly step 1's
      state and a warning; list(verify=True), a restore of step 2 by number and load_weights may
      raise CheckpointError and nothing else.
  unmapped DIR   saves a module whose extra state keeps a tensor, restores it, reads the files
      directly too (copy=False and True), truncates every file of the checkpoint, then reads every
      restored tensor: prints "ok" when all equal what was saved (a tensor still backed by the file
      would end the process with SIGBUS instead).
"""
import copy
import json
import os
import random
import sys
import traceback
import warnings

import numpy as np
import torch

torch.set_num_threads(1)

import trainpatterns as tp  # noqa: E402
from trainpatterns.checkpoint import CheckpointError, CheckpointManager  # noqa: E402
from trainpatterns.checkpoint import _format  # noqa: E402

from _holder import Holder  # noqa: E402


def make_state(seed):
    """Model (with BatchNorm buffers), fused optimizer, scheduler, a per-rank entry holding every
    kind of value the format has, and a plain value with tensors; trained ``seed`` steps."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.BatchNorm1d(9), torch.nn.Tanh(), torch.nn.Linear(9, 2))
    opt = tp.FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    g = torch.Generator().manual_seed(seed)
    for _ in range(seed):
        loss = model(torch.randn(5, 6, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    loader = Holder({
        "pos": seed, "pair": (seed, 2.5), "raw": bytes([seed, 0, 255]), "dtype": torch.bfloat16,
        "device": torch.device("cpu"), "np": np.float32(seed / 3), "arr": np.arange(seed + 3, dtype=np.int16),
        "inf": float("-inf"), "int_keys": {seed: "a", -1: None}, "t": torch.arange(6.0).reshape(2, 3) * seed,
        "half": torch.full((4,), seed, dtype=torch.float16),
    })
    return {"model": model, "opt": opt, "sched": sched, "loader": loader,
            "epoch": {"n": seed, "w": torch.linspace(0, 1, 7) * seed, "flags": torch.tensor([True, False])}}


def snapshot(state):
    """An independent deep copy of everything a restore sets, RNG states included."""
    return {
        "model": {k: v.clone() for k, v in state["model"].state_dict().items()},
        "opt": copy.deepcopy(state["opt"].state_dict()),
        "sched": copy.deepcopy(state["sched"].state_dict()),
        "loader": copy.deepcopy(state["loader"].value),
        "epoch": copy.deepcopy(state["epoch"]),
        "rng": (random.getstate(), np.random.get_state(), torch.get_rng_state()),
    }


def differences(a, b, path=""):
    """Where a and b differ (types, keys and order, tensor dtype/shape/bytes, float bits)."""
    if type(a) is not type(b):
        return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return [f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        same = torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
        return [] if same else [f"{path}: tensor bytes differ"]
    if isinstance(a, np.ndarray):
        same = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        return [] if same else [f"{path}: arrays differ"]
    if isinstance(a, float):
        same = (a != a and b != b) or (a == b and np.copysign(1, a) == np.copysign(1, b))
        return [] if same else [f"{path}: {a!r} vs {b!r}"]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{path}: keys {list(a)} vs {list(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}[{k!r}]")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def write_pristine(root):
    """Two checkpoints of different states; returns {step: snapshot of what it holds}."""
    mgr = CheckpointManager(root, keep_last=None, async_save=False)
    saved = {}
    for step in (1, 2):
        state = make_state(step)
        random.seed(step)
        np.random.seed(step)
        torch.manual_seed(step)
        saved[step] = snapshot(state)
        mgr.save(state, step, {"loss": 1.0 / step})
    return saved


def judge(directory, saved):
    """The problems with restoring ``directory`` (empty: the contract held)."""
    problems = []
    state = make_state(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            step = CheckpointManager(directory, keep_last=None).restore(state)
        except Exception:  # noqa: BLE001 - any exception breaks the contract: report it
            return None, [], [f"restore raised {traceback.format_exc()}"]
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if step not in saved:
        problems.append(f"restore returned {step!r}")
    else:
        problems += differences(snapshot(state), saved[step], f"step {step}")
        if step == 1 and not any("unusable" in w for w in warned):
            problems.append(f"fell back to step 1 without a warning: {warned}")
    mgr = CheckpointManager(directory, keep_last=None)
    model = make_state(5)["model"]
    for what, call in (("list", lambda: mgr.list(verify=True)),
                       ("restore(2)", lambda: mgr.restore(make_state(5), 2)),
                       ("load_weights", lambda: mgr.load_weights(model))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                call()
        except CheckpointError:
            pass
        except Exception:  # noqa: BLE001 - reported
            problems.append(f"{what} raised {traceback.format_exc()}")
    weights = {k: v for k, v in model.state_dict().items()}
    if not any(not differences(weights, saved[s]["model"]) for s in saved):
        problems.append("load_weights loaded weights of neither checkpoint")
    return step, warned, problems


def serve(directory):
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, never into the protocol
    saved = write_pristine(directory)
    proto.write("ready\n")
    for line in sys.stdin:
        step, warned, problems = judge(line.strip(), saved)
        proto.write(json.dumps({"step": step, "warnings": warned, "problems": problems}) + "\n")


class WithTable(torch.nn.Module):
    """A module whose extra state is a tensor it keeps as given (no copy in set_extra_state)."""

    def __init__(self, n):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.table = torch.zeros(n)

    def get_extra_state(self):
        return {"table": self.table}

    def set_extra_state(self, s):
        self.table = s["table"]


def unmapped(directory):
    torch.manual_seed(0)
    module = WithTable(300_000)
    module.table = torch.randn(300_000)
    value = {"w": torch.randn(200_000).double()}
    mgr = CheckpointManager(directory, async_save=False)
    mgr.save({"m": module, "v": value}, 1)
    path = os.path.join(directory, "step_00000001")
    fresh = WithTable(1)
    state = {"m": fresh, "v": None}
    assert mgr.restore(state) == 1
    direct = {copy_: _format.read_safetensors(os.path.join(path, "m.safetensors"), copy=copy_)[0]
              for copy_ in (False, True)}
    warm = WithTable(1)
    tp.checkpoint.load_weights(warm, path)
    for name in os.listdir(path):
        os.truncate(os.path.join(path, name), 0)
    saved = {"lin.weight": module.lin.weight.detach(), "lin.bias": module.lin.bias.detach(),
             "_extra_state.table": module.table}
    checks = [torch.equal(fresh.table, module.table), torch.equal(state["v"]["w"], value["w"]),
              torch.equal(warm.table, module.table)]
    checks += [sorted(tensors) == sorted(saved) and all(torch.equal(t, saved[k]) for k, t in tensors.items())
               for tensors in direct.values()]
    print("ok" if all(checks) else f"values differ: {checks}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif sys.argv[1] == "unmapped":
        unmapped(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
