"""The layout of a checkpoint directory: its file names, the sealed manifest, and the kinds of entry.

One directory per checkpoint, ``<directory>/step_00001234/``::

    manifest.json            written last: step, metrics, world size, size + CRC-32 of every file
    state.json               structure of the replicated entries (JSON, tensors by reference)
    <entry>.safetensors      one per replicated entry with tensors; a module's tensors are named by
                             its state_dict keys, so ``model.safetensors`` is a plain weights file
    rank_00000.json          per-rank structure: RNG states and per-rank entries (loaders, ...)
    rank_00000.safetensors   their tensors

While a checkpoint is being written it lives under ``.tmp-step_...`` (see the writer); names that
start with ``.tmp-`` are never checkpoints, nor are ``step_...corrupt-...`` (a damaged checkpoint
moved aside to make room for a new one of its step). The writer and the reader both take every name
and the manifest's seal from here, so the two cannot disagree. The file names a checkpoint's JSON
lists are only ever plain names inside its directory (:func:`check_file_name`), so a hostile
checkpoint cannot make the reader open anything outside it.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any

import torch

from .errors import CheckpointError, brief

__all__ = ["FORMAT", "VERSION", "STEP_DIR", "TMP_PREFIX", "CORRUPT_SUFFIX", "step_dir", "rank_base", "entry_file",
           "check_file_name", "manifest_crc", "seal", "entry_kind"]

FORMAT = "trainpatterns.checkpoint"
VERSION = 1
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"  # directories being written or deleted
CORRUPT_SUFFIX = ".corrupt-"  # step_00000012.corrupt-<ns>: a damaged checkpoint kept for inspection
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}$")
_RESERVED = re.compile(r"^(manifest|state|rank_\d+|entry_\d+)$")  # names of our own files


def step_dir(directory: str, step: int) -> str:
    """The path of checkpoint ``step`` in ``directory``."""
    return os.path.join(directory, f"step_{step:08d}")


def rank_base(rank: int) -> str:
    """The name, without extension, of rank ``rank``'s files (``.json``, ``.safetensors``, and while
    a distributed save runs, ``.sums`` and ``.failed``)."""
    return f"rank_{rank:05d}"


def entry_file(name: str, index: int) -> str:
    """The safetensors file of replicated entry ``name``, the ``index``-th of the state. Entry names
    are unique and generated names are reserved, so file names are unique too."""
    if _SAFE_NAME.match(name) and not _RESERVED.match(name):
        return f"{name}.safetensors"
    return f"entry_{index}.safetensors"


def check_file_name(name: Any, where: str) -> str:
    """``name`` if it is a plain file name (no directory part, not ``.``/``..``, no NUL), else
    CheckpointError: every file a checkpoint refers to lies in its own directory."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "\0" in name
            or any(sep in name for sep in ("/", os.sep, os.altsep) if sep)):
        raise CheckpointError(f"{where}: {brief(name)} is not a plain file name inside the checkpoint directory")
    return name


def manifest_crc(body: dict) -> int:
    """CRC-32 of the manifest's canonical JSON (without its own ``crc32`` field)."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return zlib.crc32(text.encode("utf-8"))


def seal(body: dict) -> dict:
    """The manifest with a CRC-32 of its own canonical JSON, so a damaged manifest is detected too."""
    return dict(body, crc32=manifest_crc(body))


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def entry_kind(obj: Any) -> str:
    """What a state entry is, as recorded in the checkpoint: "module", "optimizer", "lr_scheduler",
    "grad_scaler", "stateful" (anything else with state_dict/load_state_dict) or "value"."""
    if not _is_stateful(obj):
        return "value"
    if isinstance(obj, torch.nn.Module):
        return "module"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return "lr_scheduler"
    if isinstance(obj, torch.amp.GradScaler):
        return "grad_scaler"
    return "stateful"
