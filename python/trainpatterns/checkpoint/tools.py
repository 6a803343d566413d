"""Checkpoints for tools and scripts: read one whole, or export a module's weights as a plain file.

:func:`read_checkpoint` gives everything one checkpoint directory holds as a flat ``{name: tensor}``
and a metadata dict (step, metrics, the values that are not tensors, RNG states), with every file of
the checkpoint verified against its checksum. :func:`export_weights` writes one module entry as a
plain safetensors file, atomically. Both read as a restore reads (``reader``): nothing is unpickled,
and a missing, damaged or malformed file is a CheckpointError naming it.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Optional, Union

import numpy as np
import torch

from ._format import STEP_DIR, TMP_PREFIX, CheckpointError, decode_tree, fsync_dir, rank_base, write_safetensors
from .reader import check_files, decode_entry, malformed, read_doc, read_manifest, read_module_entry, read_tensors

__all__ = ["read_checkpoint", "export_weights"]

PathLike = Union[str, "os.PathLike[str]"]


def _checkpoint_dir(path: PathLike) -> str:
    """``path`` made absolute, if it may be one checkpoint's directory; else a CheckpointError saying
    what it is instead (a file, nothing, a manager's directory of checkpoints)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        raise CheckpointError(f"{path} is a file, not a checkpoint: pass one checkpoint's directory (such as "
                              "ckpt/step_00001234); a .safetensors file reads with safetensors.torch.load_file")
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}")
    if not os.path.exists(os.path.join(path, "manifest.json")):
        steps = sorted((int(m.group(1)), n) for n in os.listdir(path) if (m := STEP_DIR.match(n)))
        if steps:
            raise CheckpointError(f"{path} is a directory of checkpoints, not one checkpoint: pass one of its "
                                  f"step_... directories (the newest is {os.path.join(path, steps[-1][1])})")
    return path


def _check_rank(path: str, rank: Any, world: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an int, got {type(rank).__qualname__}")
    if not 0 <= rank < world:
        raise ValueError(f"{path} was written by {world} rank(s): rank must be 0 to {world - 1}, got {rank}")


def _free(name: str, tensors: dict, values: dict) -> str:
    """``name``, or ``name#1``, ``name#2``... if a tensor or a value has it already."""
    n, out = 1, name
    while out in tensors or out in values:
        out, n = f"{name}#{n}", n + 1
    return out


def _flatten(value: Any, name: str, tensors: dict, values: dict) -> None:
    """Tensors (numpy arrays as tensors) into ``tensors``, every other leaf into ``values``, each
    under its dotted path; an empty container is a leaf."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        tensors[_free(name, tensors, values)] = value
    elif isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{name}.{k}", tensors, values)
    elif isinstance(value, (list, tuple)) and value:
        for i, v in enumerate(value):
            _flatten(v, f"{name}.{i}", tensors, values)
    else:
        values[_free(name, tensors, values)] = value


def read_checkpoint(path: PathLike, *, rank: Optional[int] = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything one checkpoint holds, as ``(tensors, metadata)``, for tools and scripts.

    ``path`` is one checkpoint's directory, as :class:`CheckpointManager` writes it
    (``ckpt/step_00001234``). Every file of the checkpoint is verified against its checksum (those
    of other ranks included); a path that is not a checkpoint, or a missing, damaged or malformed
    file, is a :class:`CheckpointError` naming it. Tensors are CPU tensors that own their memory.

    ``tensors`` is flat. A tensor's name is its state entry's name, then the keys and list indices
    that lead to it inside what the entry's ``state_dict()`` returned (or inside a plain value),
    joined by ".": ``model.fc.weight``, ``optimizer.state.0.exp_avg``, ``ema.3``; an entry that is
    a tensor is named by the entry alone. (The entry's ``.safetensors`` file names them without the
    entry's prefix: ``model.safetensors`` holds ``fc.weight``.) Tied tensors, stored once, appear
    under each of their names as the same tensor object. numpy arrays come back as tensors. A name
    that comes out twice (keys with dots in them) gets ``#1``, ``#2``... on its later uses.

    ``metadata``: ``step``, ``metrics``, ``world_size``, ``time`` (of the save, seconds since the
    epoch); ``entries`` (name -> kind: "module", "optimizer", "lr_scheduler", "grad_scaler",
    "stateful" or "value", in the saved order); ``per_rank`` (the names of the entries each rank
    saved for itself, such as loaders); ``rank`` (whose per-rank entries are in ``tensors`` and
    ``values``); ``values`` (name -> every leaf that is not a tensor, named as the tensors are:
    ``optimizer.param_groups.0.lr``, a plain value entry ``epoch``; an empty dict or list is a leaf);
    ``rng`` (that rank's RNG states as saved, or None).

    ``rank``: whose per-rank entries and RNG states to read. Default: rank 0 of a one-process
    checkpoint; a checkpoint of several ranks that holds per-rank entries needs ``rank=`` (a
    ValueError says so), one that holds none gives its replicated entries (``rank`` None).
    """
    path = _checkpoint_dir(path)
    with malformed(path):
        manifest = read_manifest(path)
        spath, state_doc = read_doc(path, manifest, "state.json")
    world = manifest["world_size"]
    if rank is None and world == 1:
        rank = 0
    if rank is not None:
        _check_rank(path, rank, world)
        rank = int(rank)
    rank_file = rank_base(0 if rank is None else rank) + ".json"
    with malformed(path):
        rpath, rank_doc = read_doc(path, manifest, rank_file)
    if rank is None and rank_doc["entries"]:
        raise ValueError(f"{path} was written by {world} ranks and holds per-rank entries "
                         f"{sorted(rank_doc['entries'])}, which differ between the ranks: pass rank= (0 to "
                         f"{world - 1}) to read one rank's")
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    read = {"manifest.json", "state.json", rank_file}
    with malformed(path):
        for name, e in state_doc["entries"].items():
            f = e.get("file")
            file_tensors = read_tensors(path, manifest, f) if f else {}
            read.add(f or "")
            _flatten(decode_entry(e, file_tensors, None, f"{spath}: state[{name!r}]", place=False), name, tensors,
                     values)
        rng = None
        if rank is not None:
            f = rank_doc.get("file")
            rank_tensors = read_tensors(path, manifest, f) if f else {}
            read.add(f or "")
            for name, e in rank_doc["entries"].items():
                _flatten(decode_entry(e, rank_tensors, None, f"{rpath}: state[{name!r}]", place=False), name,
                         tensors, values)
            if rank_doc.get("rng") is not None:
                rng = decode_tree(rank_doc["rng"], rank_tensors, where=f"{rpath}: rng", place=False)
    rest = {f: info for f, info in manifest["files"].items() if f not in read}
    problem = check_files(path, {"files": rest}, verify=True)
    if problem is not None:
        raise CheckpointError(problem)
    saved_at = manifest.get("time")
    metadata = {
        "step": manifest["step"], "metrics": manifest["metrics"], "world_size": world,
        "time": saved_at if isinstance(saved_at, (int, float)) and not isinstance(saved_at, bool) else None,
        "entries": {n: e["kind"] for n, e in {**state_doc["entries"], **rank_doc["entries"]}.items()},
        "per_rank": list(rank_doc["entries"]), "rank": rank, "values": values, "rng": rng,
    }
    return tensors, metadata


def export_weights(path: PathLike, out: PathLike, *, key: Optional[str] = None) -> str:
    """Write the weights of module entry ``key`` of checkpoint ``path`` (one checkpoint's directory)
    as one plain safetensors file ``out``: the module's ``state_dict()``, which
    ``safetensors.torch.load_file`` + ``load_state_dict`` (or ``safetensors.torch.load_model``, or
    :func:`load_weights`) load into the plain model. Returns ``out`` as an absolute path.

    ``key`` defaults to the checkpoint's only module. The files read are verified against their
    checksums. Tied weights are written once, as safetensors' ``save_model`` writes them: under the
    first of their names, the others recorded in the file's metadata as ``{other: first}``
    (``load_model`` and :func:`load_weights` restore them; ``load_state_dict(strict=False)`` lists
    them as missing, and the tie fills them). The metadata also holds ``{"format": "pt"}``.

    The file is written under a temporary name beside ``out``, fsynced, then renamed over ``out``:
    a reader sees the old file or the new one, never part of one.
    """
    path = _checkpoint_dir(path)
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    if os.path.isdir(out):
        raise ValueError(f"{out} is a directory: pass the path of the .safetensors file to write")
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {out}: the directory {parent} does not exist")
    if os.path.exists(os.path.join(parent, "manifest.json")):
        raise ValueError(f"{out} is inside the checkpoint {parent}: write the weights elsewhere (a checkpoint's "
                         "files are sealed by its manifest)")
    spath, key, e, stored = read_module_entry(path, key)
    with malformed(path):
        sd = decode_entry(e, stored, None, f"{spath}: state[{key!r}]", place=False)
    bad = [k for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))] \
        if isinstance(sd, dict) else ["<the whole entry>"]
    if bad:
        raise ValueError(f"entry {key!r} of {path} is not a dict of name -> tensor (a state_dict) at {bad[:8]}: "
                         "a safetensors file holds tensors only")
    tensors, metadata, first = {}, {"format": "pt"}, {}
    for k, t in sd.items():
        name = first.setdefault(id(t), k)
        if name == k:
            tensors[k] = t
        else:
            metadata.setdefault(k, name)
    _write_replacing(out, tensors, metadata)
    return out


def _write_replacing(out: str, tensors: dict, metadata: dict) -> None:
    """Write a safetensors file to a new temporary file beside ``out``, fsync it, rename it over
    ``out`` and fsync the directory; the temporary file is removed if anything fails."""
    parent = os.path.dirname(out)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{os.path.basename(out)}.{os.getpid()}.{time.time_ns()}")
    try:
        write_safetensors(tmp, tensors, metadata)
        os.replace(tmp, out)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write {out}: {e.strerror or e} (errno {e.errno})") from e
        raise
    fsync_dir(parent)
