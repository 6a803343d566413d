"""No foreign code runs: the library never reads a pickle nor evaluates strings.

``test_package_source_reads_no_pickle`` parses every module of the installed package with ``ast``
and fails naming file:line for a call of eval/exec, pickle-family loaders (pickle, dill, marshal,
...), ``torch.load`` without ``weights_only=True``, any ``weights_only=`` other than ``True`` and
any ``allow_pickle=`` other than ``False``. The scanner is checked on a planted sample first.
``test_tune_never_executes_a_planted_state_pt`` plants a malicious pickle where the built-in tuning
objective once loaded its trial state and checks that `trainpatterns tune` does not run it.
"""
from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import trainpatterns

PACKAGE_DIR = Path(trainpatterns.__file__).resolve().parent

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
_PICKLE_READERS = {"load", "loads", "Unpickler", "open"}
_TORCH_LOADS = {"torch.load", "torch.serialization.load"}


def _aliases(tree: ast.AST) -> dict:
    """Local name -> dotted origin for every import in the module (``import pickle as p``,
    ``from pickle import loads as l``), so renamed imports are still recognised."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(func: ast.AST, aliases: dict) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return ""
    parts.append(aliases.get(func.id, func.id))
    return ".".join(reversed(parts))


def _is_const(node: ast.AST, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan(path: Path) -> list[str]:
    """``file:line: what`` for every call in ``path`` that could read a pickle or run a string."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        head, _, last = name.rpartition(".")
        where = f"{path}:{node.lineno}"
        if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            found.append(f"{where}: {name}() runs a string as code")
        if head.split(".")[0] in _PICKLE_MODULES and last in _PICKLE_READERS:
            found.append(f"{where}: {name}() reads a pickle")
        kw = {k.arg: k.value for k in node.keywords}
        if name in _TORCH_LOADS and not _is_const(kw.get("weights_only"), True):
            found.append(f"{where}: {name}() without weights_only=True unpickles")
        elif "weights_only" in kw and not _is_const(kw["weights_only"], True):
            found.append(f"{where}: weights_only= other than True unpickles")
        if "allow_pickle" in kw and not _is_const(kw["allow_pickle"], False):
            found.append(f"{where}: allow_pickle= other than False unpickles")
    return found


def test_scanner_catches_planted_samples(tmp_path):
    sample = tmp_path / "planted.py"
    sample.write_text(textwrap.dedent("""\
        import pickle, torch, numpy as np
        import pickle as pk
        from pickle import loads as from_bytes
        import dill
        model.eval()
        torch.load("a.pt", weights_only=True)
        np.load("a.npz", allow_pickle=False)
        eval("1 + 1")
        exec("x = 1")
        pickle.load(f)
        pk.loads(b"")
        from_bytes(b"")
        torch.load("a.pt")
        torch.load("a.pt", weights_only=False)
        torch.load("a.pt", map_location="cpu", weights_only=flag)
        helper(path, weights_only=False)
        np.load("a.npz", allow_pickle=True)
        dill.loads(b"")
        pickle.Unpickler(f).load()
        """))
    found = scan(sample)
    lines = sorted({int(f.split(":")[1]) for f in found})
    assert lines == list(range(8, 20)), found  # every planted line, none of the safe lines 1-7
    assert all(f.startswith(f"{sample}:") for f in found)


def test_package_source_reads_no_pickle():
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert len(files) > 20 and PACKAGE_DIR / "tuning" / "cli.py" in files
    found = [f for path in files for f in scan(path)]
    assert found == [], "\n".join(found)


class _Plant:
    """Unpickling this creates the directory ``marker``: the proof that a planted pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_tune_never_executes_a_planted_state_pt(tmp_path):
    # The files an attacker with write access to the artifact directory could plant: a plain pickle
    # and a torch.save zip, at the path the built-in objective once loaded with weights_only=False.
    trial_dirs = [tmp_path / "tune_artifacts" / "s" / f"trial_{n:05d}" for n in range(2)]
    markers = [tmp_path / "ran-pickle", tmp_path / "ran-torch-save"]
    trial_dirs[0].mkdir(parents=True)
    trial_dirs[1].mkdir(parents=True)
    (trial_dirs[0] / "state.pt").write_bytes(pickle.dumps(_Plant(str(markers[0]))))
    torch.save(_Plant(str(markers[1])), trial_dirs[1] / "state.pt")
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_DIR.parent))
    res = subprocess.run([sys.executable, "-m", "trainpatterns", "tune", "--trials", "2", "--steps", "20",
                          "--samples", "128", "--sampler", "random", "--pruner", "none", "--storage", "tune.db",
                          "--study-name", "s"], cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert not markers[0].exists() and not markers[1].exists(), "a planted pickle was executed"
    assert res.returncode == 0, res.stdout + res.stderr
    assert "trials: 2 complete, 0 pruned, 0 failed" in res.stdout, res.stdout + res.stderr
