"""CheckpointError: the one exception every part of the checkpoint code raises for a bad checkpoint.

It lives in a module of its own because the format's codecs, the file helpers, the writer and the
reader all raise it, and none of them should have to import another just to get it. ``brief``
shows a value read from a checkpoint in such an error: a hostile value may be huge or nest
thousands deep, where a plain ``repr`` would flood the message or hit the recursion limit.
"""
from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["CheckpointError", "brief"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or trusted (missing, corrupt, truncated, incompatible)."""


_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxstring, _brief.maxother = 3, 80, 80


def brief(value: Any) -> str:
    """``repr(value)``, cut to a few levels and a few dozen characters per item."""
    return _brief.repr(value)
