"""Reading checkpoints: the manifest, verification of every file, loading into live objects.

A checkpoint is trusted only as far as its manifest vouches for it: the manifest carries a CRC-32 of
itself and the size and CRC-32 of every other file, and every file a rank reads is checked against
it. Loading is in two steps so that nothing is applied from a bad checkpoint: :func:`load` reads and
verifies everything one rank needs, :func:`apply_loaded` then hands it to the live objects. Nothing
is unpickled (see ``_format``). :func:`load_weights` is the warm start: one module's weights only.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ._format import (FORMAT, VERSION, CheckpointError, crc32, decode_tree, entry_kind, manifest_crc, rank_base,
                      read_json_file, read_safetensors)
from ._rng import restore_rng

__all__ = ["Loaded", "read_manifest", "check_files", "load", "try_load", "apply_loaded", "load_weights"]

PathLike = Union[str, "os.PathLike[str]"]


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint directory ``path``, after checking its format, version and seal."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.exists(mpath):
        raise CheckpointError(f"{path} has no manifest.json (not a checkpoint, or not fully written)")
    manifest = read_json_file(mpath)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not a {FORMAT} manifest")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{mpath} has format version {manifest.get('version')}; this version reads {VERSION}")
    body = {k: v for k, v in manifest.items() if k != "crc32"}
    if manifest_crc(body) != manifest.get("crc32"):
        raise CheckpointError(f"{mpath} fails its checksum: the manifest is corrupt")
    return manifest


def check_files(path: str, manifest: dict, verify: bool) -> Optional[str]:
    """None if every file of the manifest is present with its size (and checksum, with verify)."""
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
            with open(fpath, "rb", buffering=0) as f:
                while chunk := f.read(32 << 20):
                    crc = crc32(chunk, crc)
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
    rng_tree: Any

    def tensors_for(self, name: str) -> dict:
        if name in self.rank_entries:
            return self.rank_tensors
        f = self.shared[name].get("file")
        return self.shared_tensors.get(f, {}) if f else {}


def _expected(manifest: dict, path: str, fname: str) -> tuple[int, int]:
    info = manifest["files"].get(fname)
    if info is None:
        raise CheckpointError(f"{path}: {fname} is not in the manifest")
    return info["size"], info["crc32"]


def load(path: str, rank: int) -> Loaded:
    """Read and verify everything rank ``rank`` needs from checkpoint ``path``."""
    manifest = read_manifest(path)
    world = manifest.get("world_size", 1)
    if rank >= world:
        raise CheckpointError(f"{path} was written by {world} rank(s): it holds no state for rank {rank}")
    state_doc = read_json_file(os.path.join(path, "state.json"), _expected(manifest, path, "state.json"))
    shared = state_doc["entries"]
    shared_tensors = {}
    for e in shared.values():
        f = e.get("file")
        if f:  # a module's tensors are copied into its parameters by load_state_dict: no copy here
            shared_tensors[f], _ = read_safetensors(os.path.join(path, f), _expected(manifest, path, f),
                                                    copy=e["kind"] != "module")
    base = rank_base(rank)
    rank_doc = read_json_file(os.path.join(path, base + ".json"), _expected(manifest, path, base + ".json"))
    rank_tensors = {}
    if rank_doc.get("file"):
        f = rank_doc["file"]
        rank_tensors, _ = read_safetensors(os.path.join(path, f), _expected(manifest, path, f))
    return Loaded(int(manifest["step"]), shared, shared_tensors, rank_doc["entries"], rank_tensors, rank_doc.get("rng"))


def try_load(path: str, rank: int) -> tuple[Optional[Loaded], Optional[str]]:
    """(:func:`load`'s result, None), or (None, why the checkpoint is unusable)."""
    try:
        return load(path, rank), None
    except CheckpointError as e:
        return None, str(e)
    except (KeyError, TypeError, ValueError) as e:
        return None, f"{path} is malformed ({e!r})"


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
        else:
            obj.load_state_dict(decode_tree(e["tree"], tensors, obj.state_dict(), where))
    if rng:
        if loaded.rng_tree is None:
            warnings.warn(f"checkpoint {path} holds no RNG states (saved with rng=False): RNGs not restored",
                          RuntimeWarning, stacklevel=4)
        else:
            restore_rng(decode_tree(loaded.rng_tree, loaded.rank_tensors, None, f"{path}: rng"))
    return loaded.step


def load_weights(module: torch.nn.Module, path: PathLike, *, key: Optional[str] = None, strict: bool = True):
    """Load a module's weights from a checkpoint directory (or a ``.safetensors`` file) for a warm
    start: no optimizer, RNG or loader state is touched. ``key`` names the entry when the checkpoint
    holds several modules (default: the only one). ``strict`` as in ``Module.load_state_dict`` (use
    ``strict=False`` after replacing a head). Checksums are verified. Returns what
    ``load_state_dict`` returns (missing and unexpected keys)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"load_weights needs a torch.nn.Module, got {type(module).__qualname__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        tensors, _ = read_safetensors(path, copy=False)
        live = module.state_dict()
        sd = {k: (t.to(live[k].device) if k in live else t) for k, t in tensors.items()}
        return module.load_state_dict(sd, strict=strict)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}")
    manifest = read_manifest(path)
    shared = read_json_file(os.path.join(path, "state.json"), _expected(manifest, path, "state.json"))["entries"]
    modules = [n for n, e in shared.items() if e["kind"] == "module"]
    if key is None:
        if len(modules) != 1:
            raise ValueError(f"{path} holds {len(modules)} modules {modules}: pass key= to choose one")
        key = modules[0]
    if key not in shared:
        raise ValueError(f"{path} has no entry {key!r} (modules: {modules})")
    e = shared[key]
    tensors = {}
    if e.get("file"):
        tensors, _ = read_safetensors(os.path.join(path, e["file"]), _expected(manifest, path, e["file"]), copy=False)
    sd = decode_tree(e["tree"], tensors, module.state_dict(), f"{path}: state[{key!r}]")
    return module.load_state_dict(sd, strict=strict)
