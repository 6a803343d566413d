"""Reading checkpoints: the manifest, verification of every file, loading into live objects.

A checkpoint is trusted only as far as its manifest vouches for it: the manifest carries a CRC-32 of
itself and the size and CRC-32 of every other file, and every file a rank reads is checked against
it. Past the checksums nothing is taken on trust either (a checkpoint may come from elsewhere and
be resealed): every field of the manifest and of the JSON documents is checked for type and range,
file names must be plain names inside the checkpoint's directory, and the state trees and RNG
states are decoded once as a dry run. Any failure is a CheckpointError naming the file and the
problem, which is what lets "latest"/"best" fall back to an older checkpoint.

Loading is in two steps so that nothing is applied from a bad checkpoint: :func:`load` reads and
verifies everything one rank needs, :func:`apply_loaded` then hands it to the live objects. Nothing
is unpickled (see ``_format``). :func:`load_weights` is the warm start: one module's weights only.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch

from ._fit import load_module
from ._format import (FORMAT, STEP_DIR, VERSION, CheckpointError, brief, check_file_name, crc32, decode_tree,
                      entry_kind, manifest_crc, open_regular, rank_base, read_json_file, read_safetensors,
                      storage_key)
from ._rng import check_rng, restore_rng

__all__ = ["Loaded", "read_manifest", "check_files", "read_doc", "read_tensors", "decode_entry", "module_entry",
           "malformed", "load", "try_load", "apply_loaded", "load_weights"]

PathLike = Union[str, "os.PathLike[str]"]
KINDS = ("module", "optimizer", "lr_scheduler", "grad_scaler", "stateful", "value")  # see entry_kind


@contextlib.contextmanager
def malformed(path: str) -> Iterator[None]:
    """Defence in depth around parsing: every field is checked where it is used, and anything that
    still slips through is reported as the malformed checkpoint it is, never as a stray error of
    the caller (and never as a reason to stop falling back to an older checkpoint)."""
    try:
        yield
    except CheckpointError:
        raise
    except (LookupError, TypeError, ValueError, ArithmeticError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path} is malformed ({e!r})") from e


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint directory ``path``, after checking its format, version, seal and
    every field. Its ``metrics`` come back decoded (numbers)."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.exists(mpath):
        raise CheckpointError(f"{path} has no manifest.json (not a checkpoint, or not fully written)")
    with malformed(mpath):
        manifest = read_json_file(mpath)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(f"{mpath} is not a {FORMAT} manifest")
        version = manifest.get("version")
        if not _is_int(version) or not 1 <= version <= VERSION:
            raise CheckpointError(f"{mpath} has format version {brief(version)}; this version reads 1 to {VERSION}")
        body = {k: v for k, v in manifest.items() if k != "crc32"}
        if manifest_crc(body) != manifest.get("crc32"):
            raise CheckpointError(f"{mpath} fails its checksum: the manifest is corrupt")
        _check_manifest(path, mpath, manifest)
    return manifest


def _check_manifest(path: str, mpath: str, manifest: dict) -> None:
    step, world, files = manifest.get("step"), manifest.get("world_size"), manifest.get("files")
    if not _is_int(step) or step < 0:
        raise CheckpointError(f"{mpath}: step {brief(step)} is not an int >= 0")
    named = STEP_DIR.match(os.path.basename(path))
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"{mpath} is the manifest of step {step}, not of {os.path.basename(path)}")
    if not _is_int(world) or world < 1:
        raise CheckpointError(f"{mpath}: world_size {brief(world)} is not an int >= 1")
    if not isinstance(files, dict):
        raise CheckpointError(f"{mpath}: files is not a JSON object")
    for fname, info in files.items():
        check_file_name(fname, mpath)
        if not (isinstance(info, dict) and _is_int(info.get("size")) and info["size"] >= 0
                and _is_int(info.get("crc32")) and 0 <= info["crc32"] < 1 << 32):
            raise CheckpointError(f"{mpath}: the entry of {fname!r} is not {{size, crc32}}: {brief(info)}")
    metrics = manifest.get("metrics", {})
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{mpath}: metrics is not a JSON object")
    for name, v in metrics.items():
        metrics[name] = decode_tree(v, {}, where=f"{mpath}: metric {name!r}", place=False)
        if not isinstance(metrics[name], (int, float)) or isinstance(metrics[name], bool):
            raise CheckpointError(f"{mpath}: metric {name!r} is not a number")
    manifest["metrics"] = metrics


def check_files(path: str, manifest: dict, verify: bool) -> Optional[str]:
    """None if every file of the manifest (as :func:`read_manifest` returned it) is present with its
    size (and checksum, with verify), else what is wrong."""
    for fname, info in manifest["files"].items():
        fpath = os.path.join(path, fname)
        try:
            size = os.path.getsize(fpath)
        except OSError:
            return f"{fpath} is missing"
        if size != info["size"]:
            return f"{fpath} is {size} bytes, the manifest says {info['size']}: truncated or overwritten"
        if verify:
            crc = 0
            try:
                with open_regular(fpath) as f:
                    while chunk := f.read(32 << 20):
                        crc = crc32(chunk, crc)
            except (CheckpointError, OSError) as e:
                return str(e)
            if crc != info["crc32"]:
                return (f"{fpath} fails its checksum (CRC-32 {crc:08x}, manifest {info['crc32']:08x}): "
                        "the file is corrupt")
    return None


@dataclass
class Loaded:
    """A checkpoint read and verified for one rank, not yet applied."""

    step: int
    shared: dict  # name -> {"kind", "file", "tree"}
    shared_tensors: dict  # file name -> {tensor name -> tensor}
    rank_entries: dict
    rank_tensors: dict
    rng: Optional[dict]  # decoded and checked, or None when saved with rng=False

    def tensors_for(self, name: str) -> dict:
        if name in self.rank_entries:
            return self.rank_tensors
        f = self.shared[name].get("file")
        return self.shared_tensors.get(f, {}) if f else {}


def read_doc(path: str, manifest: dict, fname: str) -> tuple[str, dict]:
    """(path, content) of JSON document ``fname``, verified against the manifest; its entries are
    checked to be {name: {kind, tree, file (None or a plain file name)}}."""
    fpath = os.path.join(path, fname)
    doc = read_json_file(fpath, _expected(manifest, path, fname))
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
        raise CheckpointError(f"{fpath} has no entries")
    for name, e in doc["entries"].items():
        if not isinstance(e, dict) or e.get("kind") not in KINDS or "tree" not in e:
            raise CheckpointError(f"{fpath}: entry {name!r} is not {{kind, tree}} of a known kind")
        if e.get("file") is not None:
            check_file_name(e["file"], f"{fpath}: entry {name!r}")
    if doc.get("file") is not None:
        check_file_name(doc["file"], fpath)
    return fpath, doc


def _expected(manifest: dict, path: str, fname: str) -> tuple[int, int]:
    info = manifest["files"].get(fname)
    if info is None:
        raise CheckpointError(f"{path}: {fname} is not in the manifest")
    return info["size"], info["crc32"]


def read_tensors(path: str, manifest: dict, fname: str, copy: bool = True) -> dict:
    return read_safetensors(os.path.join(path, fname), _expected(manifest, path, fname), copy=copy)[0]


def decode_entry(e: dict, tensors: dict, live: Any, where: str, place: bool = True) -> Any:
    """An entry's value; a module's, optimizer's, scheduler's or scaler's state must be a dict."""
    value = decode_tree(e["tree"], tensors, live, where, place=place)
    if e["kind"] not in ("stateful", "value") and not isinstance(value, dict):
        raise CheckpointError(f"{where}: the state of a {e['kind']} is a {type(value).__name__}, not a dict")
    return value


def load(path: str, rank: int) -> Loaded:
    """Read and verify everything rank ``rank`` needs from checkpoint ``path``; CheckpointError if
    anything is missing, corrupt or malformed."""
    with malformed(path):
        return _load(path, rank)


def _load(path: str, rank: int) -> Loaded:
    manifest = read_manifest(path)
    world = manifest["world_size"]
    if rank >= world:
        raise CheckpointError(f"{path} was written by {world} rank(s): it holds no state for rank {rank}")
    spath, state_doc = read_doc(path, manifest, "state.json")
    shared = state_doc["entries"]
    shared_tensors = {}
    for e in shared.values():
        f = e.get("file")
        if f and f not in shared_tensors:
            # one allocation per tensor even for a module's (copied again by load_state_dict): the
            # allocator recycles blocks of that size, as it does torch.load's, where one buffer
            # larger than its threshold is a fresh mapping, every page faulted in, at every restore
            shared_tensors[f] = read_tensors(path, manifest, f)
    rpath, rank_doc = read_doc(path, manifest, rank_base(rank) + ".json")
    rank_tensors = read_tensors(path, manifest, rank_doc["file"]) if rank_doc.get("file") else {}
    loaded = Loaded(manifest["step"], shared, shared_tensors, rank_doc["entries"], rank_tensors, None)
    for name, e in shared.items():  # a dry run: every tree decodes, so applying cannot fail on one
        decode_entry(e, loaded.tensors_for(name), None, f"{spath}: state[{name!r}]", place=False)
    for name, e in rank_doc["entries"].items():
        decode_entry(e, rank_tensors, None, f"{rpath}: state[{name!r}]", place=False)
    if rank_doc.get("rng") is not None:
        loaded.rng = decode_tree(rank_doc["rng"], rank_tensors, where=f"{rpath}: rng", place=False)
        check_rng(loaded.rng, f"{rpath}: rng")
    return loaded


def try_load(path: str, rank: int) -> tuple[Optional[Loaded], Optional[str]]:
    """(:func:`load`'s result, None), or (None, why the checkpoint is unusable)."""
    try:
        return load(path, rank), None
    except CheckpointError as e:
        return None, str(e)


def apply_loaded(state: dict, loaded: Loaded, path: str, rng: bool) -> int:
    """Load ``loaded`` into ``state`` (stateful entries by ``load_state_dict``, plain values replaced
    in ``state``) and, with ``rng``, restore the RNG states. Returns the checkpoint's step.

    Every entry of ``state`` must be in the checkpoint with the same kind (stateful or plain value),
    or nothing is applied. Called as ``restore`` -> ``CheckpointManager._apply`` -> here: the
    warnings' stacklevel points at the caller of ``restore``."""
    entries = dict(loaded.shared)
    entries.update(loaded.rank_entries)
    missing = [n for n in state if n not in entries]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no entry for {missing} (it holds {sorted(entries)}); "
                              "nothing was restored")
    for name, obj in state.items():
        saved_kind = entries[name]["kind"]
        if (saved_kind == "value") != (entry_kind(obj) == "value"):
            raise CheckpointError(f"state[{name!r}] is a {entry_kind(obj)} here but a {saved_kind} in {path}; "
                                  "nothing was restored")
    extra = sorted(set(entries) - set(state))
    if extra:
        warnings.warn(f"checkpoint {path} also holds {extra}, which state does not name: not restored",
                      RuntimeWarning, stacklevel=4)
    for name, obj in list(state.items()):
        e = entries[name]
        tensors = loaded.tensors_for(name)
        where = f"{path}: state[{name!r}]"
        if entry_kind(obj) == "value":
            state[name] = decode_tree(e["tree"], tensors, obj, where)
        elif entry_kind(obj) == "module":
            load_module(obj, decode_tree(e["tree"], tensors, obj.state_dict(), where), True,
                        f"checkpoint {path} entry {name!r}")
        else:
            obj.load_state_dict(decode_tree(e["tree"], tensors, obj.state_dict(), where))
    if rng:
        if loaded.rng is None:
            warnings.warn(f"checkpoint {path} holds no RNG states (saved with rng=False): RNGs not restored",
                          RuntimeWarning, stacklevel=4)
        else:
            restore_rng(loaded.rng)
    return loaded.step


def module_entry(path: str, shared: dict, key: Optional[str]) -> str:
    """``key``, checked to be a replicated entry of checkpoint ``path`` (whose replicated entries are
    ``shared``), or its only module when ``key`` is None; ValueError naming the modules if not."""
    modules = [n for n, e in shared.items() if e["kind"] == "module"]
    if key is None:
        if len(modules) != 1:
            raise ValueError(f"{path} holds {len(modules)} modules {modules}: pass key= to choose one")
        return modules[0]
    if key not in shared:
        raise ValueError(f"{path} has no entry {key!r} (modules: {modules})")
    return key


def _fill_tied(sd: dict, live: dict) -> None:
    """A weights file holds a tied tensor once, under one of its names (as safetensors' save_model
    writes it): the module's other names for that tensor take those values (load_state_dict then
    copies them into the one tensor the names share)."""
    names: dict = {}
    for k, t in live.items():
        if isinstance(t, torch.Tensor) and (key := storage_key(t)) is not None:
            names.setdefault(key, []).append(k)
    for group in names.values():
        src = next((k for k in group if k in sd), None)
        if src is not None:
            for k in group:
                sd.setdefault(k, sd[src])


def load_weights(module: torch.nn.Module, path: PathLike, *, key: Optional[str] = None, strict: bool = True):
    """Load a module's weights from a checkpoint directory (or a ``.safetensors`` file) for a warm
    start: no optimizer, RNG or loader state is touched. ``key`` names the entry when the checkpoint
    holds several modules (default: the only one). ``strict`` as in ``Module.load_state_dict`` (use
    ``strict=False`` after replacing a head). Checksums are verified; a damaged or malformed
    checkpoint is a CheckpointError; weights that do not fit the module (other keys or shapes) are a
    CheckpointMismatchError naming them in its first line. A file that holds tied weights once, under
    one of their names (as ``export_weights`` and safetensors' ``save_model`` write them), loads into
    a module whose names share that tensor. Returns what ``load_state_dict`` returns (missing and
    unexpected keys)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"load_weights needs a torch.nn.Module, got {type(module).__qualname__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        tensors, _ = read_safetensors(path, copy=False)
        live = module.state_dict()
        sd = {k: (t.to(live[k].device) if k in live else t) for k, t in tensors.items()}
        _fill_tied(sd, live)
        return load_module(module, sd, strict, f"weights file {path}")
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}")
    spath, key, e, tensors = read_module_entry(path, key)
    with malformed(path):
        sd = decode_entry(e, tensors, module.state_dict(), f"{spath}: state[{key!r}]")
    return load_module(module, sd, strict, f"checkpoint {path} entry {key!r}")


def read_module_entry(path: str, key: Optional[str]) -> tuple:
    """(state.json's path, the entry's name, its record, its stored tensors, checksummed) of the
    module entry ``key`` of the checkpoint directory ``path`` (None: the one module entry)."""
    with malformed(path):
        manifest = read_manifest(path)
        spath, state_doc = read_doc(path, manifest, "state.json")
    key = module_entry(path, state_doc["entries"], key)
    e = state_doc["entries"][key]
    with malformed(path):
        tensors = read_tensors(path, manifest, e["file"], copy=False) if e.get("file") else {}
    return spath, key, e, tensors
