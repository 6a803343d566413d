"""Damaged and hostile checkpoints: every restore returns the exact saved state or falls back.

Two real checkpoints (steps 1 and 2) are written by a worker process; each case copies them,
damages step 2 (raw damage: bit flips, truncation, appended or overwritten bytes, removed and
renamed files; or hostile edits that are resealed, so that the checksums vouch for them: headers
with impossible shapes and offsets, manifest fields of the wrong type, file names outside the
checkpoint, unknown dtype names, deep nesting, broken RNG states) and asks the worker to restore.
The contract: step 2 with exactly its state, or step 1 with exactly its state and a warning; no
other exception and no crash. The worker runs many cases, one per line, so a signal or a hang is
seen as one, with the case that caused it. Worker code: tests/_checkpoint_fault_worker.py.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _checkpoint_fault_worker as fw
import trainpatterns as tp
from trainpatterns.checkpoint import CheckpointError, CheckpointManager
from trainpatterns.checkpoint._format import (DTYPES, TensorSink, check_file_name, decode_tree, encode_tree,
                                              manifest_crc, read_safetensors, write_safetensors)

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "_checkpoint_fault_worker.py")
PYTHON_DIR = str(Path(tp.__file__).resolve().parent.parent)  # the worker imports the same build
STEP2 = "step_00000002"
REMOVE = object()  # set_at: delete the key instead


# --------------------------------------------------------------------------------------------------
# the worker

class Server:
    """One worker process restoring case after case; restarted after it dies or hangs."""

    def __init__(self, root: Path) -> None:
        self.root, self.proc, self.cases = root, None, 0
        self.pristine: Path = root / "pristine"
        self.stderr = open(root / "worker-stderr.txt", "a+")

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.pristine = self.root / f"pristine-{self.cases}"
        self.proc = subprocess.Popen([sys.executable, WORKER, "serve", str(self.pristine)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        assert self._line(180) == "ready\n", f"the worker did not start: {self._stderr_tail()}"

    def _line(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def _stderr_tail(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()[-3000:]

    def ask(self, case: Path) -> dict:
        self.proc.stdin.write(f"{case}\n")
        self.proc.stdin.flush()
        line = self._line(60)
        if line:
            return json.loads(line)
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait()
        self.proc = None
        return {"step": None, "warnings": [],
                "problems": [f"the worker {'hung' if line is None else 'died'} (exit {rc}): {self._stderr_tail()}"]}

    def run(self, damage) -> dict:
        """Copy the pristine checkpoints, apply ``damage(step 2's directory)``, restore."""
        if self.proc is None:
            self.start()
        self.cases += 1
        case = self.root / f"case-{self.cases}"
        shutil.copytree(self.pristine, case)
        damage(case / STEP2)
        try:
            return self.ask(case)
        finally:
            shutil.rmtree(case, ignore_errors=True)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.stderr.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("faults"))
    s.start()
    yield s
    s.close()


def assert_falls_back(result: dict, *words: str) -> None:
    assert not result["problems"], "\n".join(result["problems"])
    assert result["step"] == 1, f"restored step {result['step']}, expected the fallback to step 1"
    assert any(all(w in m for w in words) for m in result["warnings"]), (words, result["warnings"])


# --------------------------------------------------------------------------------------------------
# editing checkpoints on disk

def dump(obj) -> bytes:
    """Compact JSON; the string "@@deep<n>@@" becomes a list nested n deep."""
    text = json.dumps(obj, separators=(",", ":"))
    for n in (150, 100_000):
        text = text.replace(f'"@@deep{n}@@"', "[" * n + "]" * n)
    return text.encode()


def set_at(doc, path: tuple, value):
    """``doc`` with ``value`` at ``path``; unchanged where an earlier edit removed the place."""
    if not path:
        return value
    try:
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if value is REMOVE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    except (LookupError, TypeError):
        pass
    return doc


def load_doc(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # an earlier edit made it unreadable: leave it so
        return REMOVE


def edit_json(d: Path, fname: str, path: tuple, value) -> None:
    doc = load_doc((d / fname).read_bytes())
    if doc is not REMOVE:
        (d / fname).write_bytes(dump(set_at(doc, path, value)))


def split_st(p: Path) -> tuple:
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return load_doc(raw[8:8 + n]), raw[8 + n:]


def edit_header(d: Path, fname: str, path: tuple, value) -> None:
    header, data = split_st(d / fname)
    if header is REMOVE:
        return
    head = dump(set_at(header, path, value))
    (d / fname).write_bytes(len(head).to_bytes(8, "little") + head + data)


def file_info(p: Path) -> dict:
    data = p.read_bytes()
    return {"size": len(data), "crc32": zlib.crc32(data)}


def reseal(d: Path, changed=(), manifest_edits=()) -> None:
    """Make the manifest vouch for the files named in ``changed`` as they are now, apply
    ``manifest_edits`` ((path, value) pairs) and seal the manifest again. Only the changed files'
    entries are rewritten, so an earlier hostile edit of the manifest stays."""
    m = load_doc((d / "manifest.json").read_bytes())
    if m is REMOVE:
        return
    files = m.get("files") if isinstance(m, dict) else None
    for name in changed:
        if isinstance(files, dict) and name in files:
            files[name] = file_info(d / name)
    for path, value in manifest_edits:
        m = set_at(m, path, value)
    if isinstance(m, dict):
        m["crc32"] = manifest_crc({k: v for k, v in m.items() if k != "crc32"})
    (d / "manifest.json").write_bytes(dump(m))


def outside_name(d: Path, fname: str, absolute: bool) -> str:
    """A name for step 1's ``fname`` as seen from step 2's directory."""
    target = d.parent / "step_00000001" / fname
    return str(target) if absolute else f"../step_00000001/{fname}"


# --------------------------------------------------------------------------------------------------
# hostile values: each is invalid wherever it is put, so a sealed checkpoint holding one must fall back

BAD_NODES = [
    {"$dtype": "Tensor"}, {"$dtype": "nn"}, {"$dtype": "load"}, {"$dtype": "float"}, {"$dtype": 5},
    {"$device": "bogus"}, {"$device": "cuda:-1"}, {"$device": 7}, {"$tensor": "no such tensor", "device": "cpu"},
    {"$tensor": ["x"]}, {"$float": "1"}, {"$float": 1.0}, {"$np": "O", "value": 1}, {"$np": ",", "value": 1},
    {"$np": "<i1", "value": 1000}, {"$np": "<f8", "value": [1]}, {"$np": "<f8"}, {"$bytes": "!!"}, {"$bytes": 5},
    {"$tuple": 5}, {"$dict": 5}, {"$dict": [[1]]}, {"$dict": [[[1], 2]]}, {"$ndarray": "nothing"},
    {"$import": "os.system"}, {"$tuple": [], "extra": 1}, "@@deep150@@", "@@deep100000@@",
]
BAD_SHAPES = [[-1], [2**63], [2**64], [0, 2**62, 2**62], "x", None, [1.5], [True], [[2]], [1] * 65]
BAD_DTYPES = ["F128", "", 5, None, "torch.float32", ["F32"]]
BAD_OFFSETS = [[-1, 0], [0], [0, 2**64], "x", None, [0.0, 4.0], [True, 5], [2**63, 2**63 + 4]]
BAD_ENTRIES = [5, [], "x", None, {}, "@@deep100000@@"]


def tensor_names(p: Path) -> list:
    return sorted(k for k in split_st(p)[0] if k != "__metadata__")


def json_paths(doc, path=()) -> list:
    """Every place in a JSON document (the first few items of long lists only)."""
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += json_paths(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            out += json_paths(v, path + (i,))
    return out


def hostile_edits(d: Path) -> dict:
    """Hostile edits of step 2 at ``d`` that a restore must refuse, by group: (kind, args...)."""
    header, manifest, names, schema, tree = [], [], [], [], []
    for fname in ("model.safetensors", "opt.safetensors", "rank_00000.safetensors"):
        name = tensor_names(d / fname)[0]
        header += [("header", fname, (name, "shape"), v) for v in BAD_SHAPES]
        header += [("header", fname, (name, "dtype"), v) for v in BAD_DTYPES]
        header += [("header", fname, (name, "data_offsets"), v) for v in BAD_OFFSETS]
        header += [("header", fname, (name,), v) for v in BAD_ENTRIES]
        header += [("header", fname, ("__metadata__",), v) for v in (5, {"a": 1}, [], "x")]
        header += [("header", fname, (), v) for v in ([], 5, "@@deep100000@@")]
    manifest += [("manifest", ("step",), v) for v in (-1, "2", 2.5, True, None, 3, 2**70, REMOVE)]
    manifest += [("manifest", ("world_size",), v) for v in (0, -1, "1", None, 1.5, True, REMOVE)]
    manifest += [("manifest", ("version",), v) for v in (0, 2, "1", None, 1.0, True, REMOVE)]
    manifest += [("manifest", ("format",), v) for v in ("x", None, 5, REMOVE)]
    manifest += [("manifest", ("files",), v) for v in ([], "x", None, {}, REMOVE)]
    manifest += [("manifest", ("metrics",), v) for v in ([], "x", {"loss": "x"}, {"loss": True}, {"loss": [1]})]
    manifest += [("manifest", ("metrics", "loss"), v) for v in BAD_NODES]
    for fname in ("state.json", "model.safetensors", "rank_00000.json"):
        manifest += [("manifest", ("files", fname), v) for v in (5, [], {"size": 1}, {"crc32": 1}, REMOVE)]
        manifest += [("manifest", ("files", fname, "size"), v) for v in ("1", -1, None, 1.5, True, 2**64)]
        manifest += [("manifest", ("files", fname, "crc32"), v) for v in (-1, 2**32, "0", None, True)]
    for absolute in (False, True):
        names += [("badname", "state.json", ("entries", "model", "file"), "model.safetensors", absolute),
                  ("badname", "rank_00000.json", ("file",), "rank_00000.safetensors", absolute),
                  ("badname", None, None, "state.json", absolute)]
    for v in ("", ".", "..", "sub/model.safetensors", "model.safetensors\u0000", 5, []):
        names += [("json", "state.json", ("entries", "model", "file"), v), ("json", "rank_00000.json", ("file",), v),
                  ("manifest", ("files", v if isinstance(v, str) else "x/y"), {"size": 1, "crc32": 0})]
    schema += [("json", "state.json", ("entries",), v) for v in ([], "x", None, 5)]
    schema += [("json", "state.json", ("entries", "opt"), v) for v in (5, [], {}, {"kind": "bogus", "tree": {}})]
    schema += [("json", "state.json", ("entries", "opt", "kind"), v) for v in ("bogus", None, 5, REMOVE)]
    schema += [("json", "state.json", ("entries", "opt", "tree"), v) for v in (REMOVE, 5, [], "x")]
    schema += [("json", "rank_00000.json", ("rng",), v) for v in (5, "x", [], {}, {"python": 1})]
    schema += [("json", "rank_00000.json", ("rng", "python"), v) for v in (5, [3, [1, 2], None], "x", [3])]
    schema += [("json", "rank_00000.json", ("rng", "numpy"), v) for v in (5, ["MT19937"], {"$tuple": ["PCG64", 1]})]
    schema += [("json", "rank_00000.json", ("rng", "torch"), v)
               for v in (5, {"$tensor": "loader.half", "device": "cpu"}, {"$tensor": "loader.t", "device": "cpu"})]
    for fname in ("state.json", "rank_00000.json"):
        paths = json_paths(json.loads((d / fname).read_bytes()))[1:]
        tree += [("json", fname, p, v) for p in paths for v in BAD_NODES
                 if p[-1] not in ("format", "version", "rank")]  # fields a restore does not use
    return {"header": header, "manifest": manifest, "names": names, "schema": schema, "tree": tree}


def apply_hostile(d: Path, edit: tuple) -> None:
    kind, rest = edit[0], edit[1:]
    manifest_edits, changed = [], []
    if kind == "header":
        edit_header(d, *rest)
        changed.append(rest[0])
    elif kind == "json":
        edit_json(d, *rest)
        changed.append(rest[0])
    elif kind == "manifest":
        manifest_edits.append(rest)
    elif kind == "badname":  # a name outside the checkpoint, for a real file the manifest vouches for
        fname, path, target, absolute = rest
        name = outside_name(d, target, absolute)
        if fname is not None:
            edit_json(d, fname, path, name)
            changed.append(fname)
        manifest_edits.append((("files", name), file_info(d.parent / "step_00000001" / target)))
    reseal(d, changed, manifest_edits)


# --------------------------------------------------------------------------------------------------
# the contract on chosen cases (each names what it tests)

def test_pristine_checkpoints_restore_exactly(server):
    result = server.run(lambda d: None)
    assert not result["problems"] and result["step"] == 2 and not result["warnings"], result


@pytest.mark.parametrize("absolute", [False, True], ids=["parent", "absolute"])
@pytest.mark.parametrize("where", ["state-entry", "rank-file", "manifest"])
def test_file_names_outside_the_step_directory_are_refused(server, where, absolute):
    fname, path, target = {"state-entry": ("state.json", ("entries", "model", "file"), "model.safetensors"),
                           "rank-file": ("rank_00000.json", ("file",), "rank_00000.safetensors"),
                           "manifest": (None, None, "state.json")}[where]
    result = server.run(lambda d: apply_hostile(d, ("badname", fname, path, target, absolute)))
    assert_falls_back(result, STEP2, "not a plain file name")


@pytest.mark.parametrize("name", ["Tensor", "nn", "load", "save", "float", "__class__", "float128"])
def test_dtype_tag_names_only_dtypes_of_the_format(server, name):
    result = server.run(lambda d: apply_hostile(
        d, ("json", "rank_00000.json", ("entries", "loader", "tree", "dtype"), {"$dtype": name})))
    assert_falls_back(result, "rank_00000.json", "is not a dtype")


HOSTILE = {  # id -> (edit, words the warning must hold)
    "shape-negative": (("header", "model.safetensors", ("0.bias", "shape"), [-1]), ("model.safetensors", "shape")),
    "shape-overflow": (("header", "model.safetensors", ("0.bias", "shape"), [2**64]), ("model.safetensors", "shape")),
    "shape-strides-overflow": (("header", "opt.safetensors", ("state.0.step", "shape"), [0, 2**62, 2**62]),
                               ("opt.safetensors", "shape")),
    "dtype-unknown": (("header", "model.safetensors", ("0.bias", "dtype"), "F128"), ("model.safetensors", "dtype")),
    "offsets-huge": (("header", "model.safetensors", ("0.bias", "data_offsets"), [0, 2**70]), ("model.safetensors",)),
    "header-deep": (("header", "model.safetensors", ("0.bias",), "@@deep100000@@"), ("model.safetensors", "JSON")),
    "header-entry-missing-fields": (("header", "model.safetensors", ("0.bias",), {}), ("model.safetensors", "dtype")),
    "metadata-not-strings": (("header", "opt.safetensors", ("__metadata__",), {"a": 1}), ("opt.safetensors",)),
    "manifest-files-missing": (("manifest", ("files",), REMOVE), ("manifest.json", "files")),
    "manifest-size-string": (("manifest", ("files", "state.json", "size"), "2220"), ("manifest.json", "state.json")),
    "manifest-crc-missing": (("manifest", ("files", "state.json", "crc32"), REMOVE), ("manifest.json", "state.json")),
    "manifest-step-string": (("manifest", ("step",), "2"), ("manifest.json", "step")),
    "manifest-step-other": (("manifest", ("step",), 3), ("manifest.json", "step 3")),
    "manifest-world-zero": (("manifest", ("world_size",), 0), ("manifest.json", "world_size")),
    "manifest-version-string": (("manifest", ("version",), "1"), ("manifest.json", "version")),
    "manifest-metric-tensor": (("manifest", ("metrics", "loss"), {"$tensor": "x"}), ("manifest.json", "loss")),
    "state-entries-list": (("json", "state.json", ("entries",), []), ("state.json", "entries")),
    "state-kind-unknown": (("json", "state.json", ("entries", "opt", "kind"), "bogus"), ("state.json", "opt")),
    "state-tree-missing": (("json", "state.json", ("entries", "opt", "tree"), REMOVE), ("state.json", "opt")),
    "optimizer-state-not-dict": (("json", "state.json", ("entries", "opt", "tree"), 5), ("state.json", "not a dict")),
    "tensor-device-bad": (("json", "state.json", ("entries", "model", "tree", "0.bias", "device"), "nowhere:0"),
                          ("state.json", "not a device")),
    "device-tag-bad": (("json", "rank_00000.json", ("entries", "loader", "tree", "device"), {"$device": "cuda:-1"}),
                       ("rank_00000.json", "not a device")),
    "np-object": (("json", "rank_00000.json", ("entries", "loader", "tree", "np"), {"$np": "O", "value": 1}),
                  ("rank_00000.json", "numpy")),
    "tree-deep": (("json", "state.json", ("entries", "opt", "tree", "param_groups"), "@@deep150@@"),
                  ("state.json", "deep")),
    "rng-python": (("json", "rank_00000.json", ("rng", "python"), [3, [1, 2], None]), ("rank_00000.json", "RNG")),
    "rng-torch-not-tensor": (("json", "rank_00000.json", ("rng", "torch"), 5), ("rank_00000.json", "RNG")),
    "rng-torch-wrong-tensor": (("json", "rank_00000.json", ("rng", "torch"), {"$tensor": "loader.t"}),
                               ("rank_00000.json", "RNG")),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_sealed_checkpoint_falls_back(server, case):
    edit, words = HOSTILE[case]
    assert_falls_back(server.run(lambda d: apply_hostile(d, edit)), STEP2, *words)


def test_fifo_in_place_of_a_file_is_refused_not_waited_on(server):
    def fifo(d):
        os.remove(d / "opt.safetensors")
        os.mkfifo(d / "opt.safetensors")
        reseal(d, manifest_edits=[(("files", "opt.safetensors"), {"size": 0, "crc32": 0})])

    assert_falls_back(server.run(fifo), "opt.safetensors", "not a regular file")


# --------------------------------------------------------------------------------------------------
# the contract on generated cases

def raw_damage(d: Path) -> st.SearchStrategy:
    sizes = {p.name: p.stat().st_size for p in sorted(d.iterdir())}
    names = sorted(sizes)
    fname = st.sampled_from(names)
    op = st.one_of(
        fname.flatmap(lambda f: st.tuples(st.just("flip"), st.just(f), st.integers(0, sizes[f] - 1),
                                          st.integers(1, 255))),
        fname.flatmap(lambda f: st.tuples(st.just("truncate"), st.just(f), st.integers(0, sizes[f] - 1))),
        fname.flatmap(lambda f: st.tuples(st.just("overwrite"), st.just(f), st.integers(0, sizes[f] - 1),
                                          st.binary(min_size=1, max_size=64))),
        st.tuples(st.just("extend"), fname, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("remove"), fname),
        st.tuples(st.just("rename"), fname, st.sampled_from(names + ["x.safetensors", "manifest.json.bak"])),
    )
    # the directory renamed to a newer step: its manifest names another
    return st.tuples(st.lists(op, min_size=1, max_size=3), st.sampled_from([None, 3, 7, 99999999]))


def apply_raw(d: Path, ops: list, new_step) -> None:
    for op in ops:
        p = d / op[1]
        if not p.exists():
            continue
        if op[0] in ("flip", "overwrite"):
            data = bytearray(p.read_bytes())
            if not data:
                continue
            at = op[2] % len(data)  # an earlier op may have shortened the file
            patch = bytes([data[at] ^ op[3]]) if op[0] == "flip" else op[3]
            data[at:at + len(patch)] = patch
            p.write_bytes(bytes(data))
        elif op[0] == "truncate":
            os.truncate(p, op[2])
        elif op[0] == "extend":
            p.write_bytes(p.read_bytes() + op[2])
        elif op[0] == "remove":
            os.remove(p)
        elif op[1] != op[2]:
            os.replace(p, d / op[2])
    if new_step is not None:
        os.rename(d, d.parent / f"step_{new_step:08d}")


def _examples(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


CI_AND_SLOW = [pytest.param(250, id="ci"), pytest.param(3000, id="slow", marks=pytest.mark.slow)]


@pytest.mark.parametrize("examples", CI_AND_SLOW)
def test_property_raw_damage_falls_back_or_restores_exactly(server, examples):
    @_examples(examples)
    @given(raw_damage(server.pristine / STEP2))
    def case(damage):
        result = server.run(lambda d: apply_raw(d, *damage))
        assert not result["problems"], "\n".join(result["problems"])

    case()


@pytest.mark.parametrize("group", ["header", "manifest", "names", "schema"])
def test_every_fixed_hostile_edit_falls_back(server, group):
    failed = []
    for edit in hostile_edits(server.pristine / STEP2)[group]:
        result = server.run(lambda d: apply_hostile(d, edit))
        if result["problems"] or result["step"] != 1 or not any("unusable" in w for w in result["warnings"]):
            failed.append((edit, result))
    assert not failed, f"{len(failed)} edits not refused, the first: {failed[0]}"


@pytest.mark.parametrize("examples", CI_AND_SLOW)
def test_property_hostile_sealed_edits_fall_back(server, examples):
    groups = hostile_edits(server.pristine / STEP2)
    edit = st.one_of([st.sampled_from(g) for g in groups.values()])

    @_examples(examples)
    @given(st.lists(edit, min_size=1, max_size=3))
    def case(chosen):
        def damage(d):
            for e in chosen:
                apply_hostile(d, e)

        assert_falls_back(server.run(damage), "unusable")

    case()


# --------------------------------------------------------------------------------------------------
# in-process: the corrupt newest checkpoint's step saved again; the codecs' checks

def _flip_a_tensor_byte(d: Path) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-3] ^= 0x10  # same size: only a checksum sees it
    (d / "model.safetensors").write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    _flip_a_tensor_byte,
    lambda d: apply_hostile(d, ("json", "state.json", ("entries", "opt", "tree", "state"), {"$dtype": "Tensor"})),
], ids=["damaged-bytes", "malformed-resealed"])
def test_a_damaged_checkpoint_is_moved_aside_and_its_step_saved_again(tmp_path, damage):
    mgr = CheckpointManager(tmp_path, keep_last=None, async_save=False)
    state = fw.make_state(1)
    for step in (1, 2, 3):
        state["epoch"]["n"] = step
        mgr.save(state, step)
    damage(tmp_path / "step_00000003")
    damaged = {p.name: p.read_bytes() for p in (tmp_path / "step_00000003").iterdir()}
    state = fw.make_state(2)
    with pytest.warns(RuntimeWarning, match="step_00000003"):
        assert mgr.restore(state) == 2
    state = fw.make_state(3)  # training went on: other weights, optimizer state, values
    saved = fw.snapshot(state)
    with pytest.warns(RuntimeWarning, match="replacing the unusable checkpoint"):
        mgr.save(state, 3)
    aside = [n for n in os.listdir(tmp_path) if n.startswith("step_00000003.corrupt-")]
    assert len(aside) == 1 and {p.name: p.read_bytes() for p in (tmp_path / aside[0]).iterdir()} == damaged
    assert [(i.step, i.valid) for i in mgr.list(verify=True)] == [(1, True), (2, True), (3, True)]
    fresh = fw.make_state(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CheckpointManager(tmp_path, keep_last=None).restore(fresh) == 3
    assert not fw.differences(fw.snapshot(fresh), saved)
    with pytest.raises(CheckpointError, match="already exists"):
        mgr.save(state, 3)  # a good one is never replaced


def test_decode_accepts_exactly_the_dtype_table():
    for name, dtype in DTYPES.items():
        tree = encode_tree(dtype, TensorSink(), "t")
        assert tree == {"$dtype": name} and decode_tree(tree, {}) is dtype
    assert {"float32", "bfloat16", "int64", "bool"} <= set(DTYPES)
    for name in sorted(set(dir(torch)) - set(DTYPES))[::7] + ["Tensor", "load", "nn", "float", "half", ""]:
        with pytest.raises(CheckpointError, match="is not a dtype"):
            decode_tree({"$dtype": name}, {}, where="here")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", ".", "", "x\0y", 5, None])
def test_file_names_must_be_plain(name):
    with pytest.raises(CheckpointError, match="not a plain file name"):
        check_file_name(name, "here")
    assert check_file_name("model.safetensors", "here") == "model.safetensors"


def _with_header(tmp_path, entry) -> Path:
    p = tmp_path / "t.safetensors"
    write_safetensors(str(p), {"a": torch.arange(4.0)}, {})
    edit_header(tmp_path, "t.safetensors", ("a",), entry)
    return p


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]},
    {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**80]},
    {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]},
    {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]},
    {"shape": [4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [4]},
    {"dtype": "F32", "shape": [4], "data_offsets": {"0": 16}},
    "@@deep100000@@", 5,
], ids=lambda e: json.dumps(e)[:40])
@pytest.mark.parametrize("copy", [True, False])
def test_hostile_safetensors_header_is_a_checkpoint_error_naming_the_file(tmp_path, entry, copy):
    p = _with_header(tmp_path, entry)
    with pytest.raises(CheckpointError, match="t.safetensors"):
        read_safetensors(str(p), copy=copy)


def test_restored_tensors_survive_truncating_the_files(tmp_path):
    proc = subprocess.run([sys.executable, WORKER, "unmapped", str(tmp_path / "ck")], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=PYTHON_DIR))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stdout, proc.stderr[-2000:])
