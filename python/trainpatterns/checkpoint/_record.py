"""The directory's record: how the manager that saves in a checkpoint directory ranks its checkpoints.

``<directory>/manager.json`` holds the metric that ``keep_best`` and "best" rank by, its mode, and
the state entry that holds the model's weights, so that a manager opened later on the directory
(another program, another person) restores "best" and loads weights without being told again what
the run that wrote it knew. Rank 0 writes it at a manager's first save when it differs from what is
on disk: a temporary file, fsynced, renamed over the old one (a reader sees the old record or the
new one, never a torn one), then the directory fsynced. A record is read as untrusted input:
anything but the documented fields with the documented types is a CheckpointError naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from ._format import TMP_PREFIX, CheckpointError, brief, fsync_dir, read_json_file, write_json_file

__all__ = ["RECORD", "Record", "read_record", "write_record", "settle"]

RECORD = "manager.json"
_FORMAT = "trainpatterns.checkpoint.directory"
_VERSION = 1
_MODES = ("min", "max")
_MAX_NAME = 1000  # a metric or entry name; far beyond any real one


@dataclass(frozen=True)
class Record:
    """What a directory records (or a manager was given): None where nothing is known."""

    metric: Optional[str] = None
    mode: Optional[str] = None
    weights_key: Optional[str] = None


def _name(doc: dict, field: str, path: str) -> Optional[str]:
    value = doc.get(field)
    if value is not None and not (isinstance(value, str) and 0 < len(value) <= _MAX_NAME):
        raise CheckpointError(f"{path}: {field} {brief(value)} is not a name (a non-empty string) or null")
    return value


def read_record(directory: str) -> Optional[Record]:
    """The record of ``directory``, None when it has none; CheckpointError when it is malformed."""
    path = os.path.join(directory, RECORD)
    if not os.path.lexists(path):
        return None
    doc: Any = read_json_file(path)
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a {_FORMAT} record (delete it, or pass metric=, mode= and "
                              "weights_key= to the manager, whose next save rewrites it)")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= _VERSION:
        raise CheckpointError(f"{path} has version {brief(version)}; this version reads 1 to {_VERSION}")
    metric, mode, weights_key = _name(doc, "metric", path), doc.get("mode"), _name(doc, "weights_key", path)
    if (mode not in _MODES) if metric is not None else (mode is not None):
        raise CheckpointError(f"{path}: mode {brief(mode)} with metric {brief(metric)}: a metric needs "
                              f"mode 'min' or 'max', no metric needs mode null")
    return Record(metric, mode, weights_key)


def write_record(directory: str, record: Record) -> None:
    """Replace ``directory``'s record with ``record``, atomically and durably (rank 0 only)."""
    path = os.path.join(directory, RECORD)
    tmp = os.path.join(directory, f"{TMP_PREFIX}{RECORD}.{os.getpid()}")
    doc = {"format": _FORMAT, "version": _VERSION, "metric": record.metric, "mode": record.mode,
           "weights_key": record.weights_key}
    try:
        if os.path.lexists(tmp):  # left by a killed process that had this pid
            os.remove(tmp)
        write_json_file(tmp, doc)
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from e


def settle(given: Record, recorded: Optional[Record]) -> Record:
    """What a manager uses: what it was given, else what the directory records. The recorded mode
    belongs to the recorded metric, so a metric given without a mode takes it only when the two
    metrics agree; the mode defaults to "min"."""
    recorded = recorded or Record()
    metric = given.metric or recorded.metric
    mode = given.mode or (recorded.mode if metric == recorded.metric else None) or "min"
    return Record(metric, mode, given.weights_key or recorded.weights_key)
