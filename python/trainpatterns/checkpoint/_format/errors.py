"""CheckpointError: the one exception every part of the checkpoint code raises for a bad checkpoint.

It lives in a module of its own because the format's codecs, the file helpers, the writer and the
reader all raise it, and none of them should have to import another just to get it.
"""
from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or trusted (missing, corrupt, truncated, incompatible)."""
