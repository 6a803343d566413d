"""The Trainer's ``metrics.jsonl``: one JSON record per virtual epoch, appended by rank 0, and put
back in order when a run resumes.

A run that is killed can leave the file ahead of its newest checkpoint (records of virtual epochs
whose checkpoint never committed, a last line cut off mid-write) or behind it (killed after the
checkpoint committed but before its record was appended). The resumed run repeats the epochs after
its checkpoint, so :func:`tidy` makes the file hold exactly the records up to the restored step: the
longest prefix of complete records with rising steps at or before that step, then the records the
checkpoint's history has after the prefix. The new content replaces the file atomically (temporary file, fsync,
rename), so a kill during the tidy leaves either the old file or the new one.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from .checkpoint._format import fsync_dir

__all__ = ["append", "tidy"]


def append(path: str, record: dict) -> None:
    """Append ``record`` as one line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _record_step(line: bytes) -> Optional[int]:
    """The ``step`` of a complete record line; None when the line is not a record."""
    try:
        record = json.loads(line)
    except ValueError:  # a torn or glued line (UnicodeDecodeError is a ValueError too)
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def tidy(path: str, step: int, history: Sequence[dict]) -> None:
    """Make ``path`` hold the run's records up to ``step`` and nothing after: the records a restore
    from ``step`` (with ``history``, the restored per-epoch records) continues from. Untouched when
    it already does."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        data = b""
    keep, last, pos = 0, None, 0
    while (end := data.find(b"\n", pos)) >= 0:  # a last line without its newline is torn
        line = data[pos:end]
        if line.strip():
            found = _record_step(line)
            if found is None or found > step or (last is not None and found <= last):
                break
            last = found
        pos = keep = end + 1
    missing = [r for r in history if isinstance(r.get("step"), int) and (last is None or r["step"] > last)
               and r["step"] <= step]
    if keep == len(data) and not missing:
        return
    content = data[:keep] + b"".join((json.dumps(r) + "\n").encode() for r in missing)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
