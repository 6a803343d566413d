"""Durable files: create-only writes, fsync (now or deferred), and files checked on read.

A checkpoint is only as good as its weakest file, so every write here goes to a file that did not
exist before, every OS error becomes a :class:`CheckpointError` naming the file and errno, and
nothing counts as written until it has been fsynced. On read, only regular files are opened (a FIFO
or device planted in a checkpoint would block or never end) and a JSON file that does not parse,
nesting included, is a CheckpointError. The safetensors code and the checkpoint writer and reader
build on these helpers.
"""
from __future__ import annotations

import json
import os
import stat
from typing import Any, Optional

from .checksum import crc32
from .errors import CheckpointError

__all__ = ["DeferredSync", "write_json_file", "read_json_file", "fsync_dir", "open_new", "write_all", "finish",
           "check_size", "open_regular", "parse_json"]


_UNVOUCHED_JSON_MAX = 64 << 20  # a manifest of thousands of ranks is well under a megabyte


def write_all(fd: int, buf, path: str) -> None:
    """Write every byte of ``buf`` to ``fd`` (``os.write`` may write fewer than asked)."""
    view = memoryview(buf)
    while len(view):
        try:
            n = os.write(fd, view)
        except OSError as e:
            raise CheckpointError(f"writing {path} failed: {e.strerror or e} (errno {e.errno})") from e
        view = view[n:]


class DeferredSync:
    """Files written but not yet fsynced, still open: one checkpoint's files are all written first
    and fsynced together at the end, so the disk flushes one file while the next is being copied
    into the page cache, instead of the writer waiting for each flush in turn. The descriptors stay
    open until their fsync because Linux reports a background writeback error only to descriptors
    that were open when it happened."""

    def __init__(self) -> None:
        self._files: list[tuple[int, str]] = []

    def add(self, fd: int, path: str) -> None:
        self._files.append((fd, path))

    def sync_all(self) -> None:
        """fsync every file (raising CheckpointError on the first failure) and close them all."""
        try:
            for fd, path in self._files:
                _fsync(fd, path)
        finally:
            self.close()

    def close(self) -> None:
        files, self._files = self._files, []
        for fd, _ in files:
            os.close(fd)


def finish(fd: int, path: str, defer_sync: Optional[DeferredSync]) -> None:
    """A fully written file: fsync and close it now, or hand it to ``defer_sync`` for later."""
    if defer_sync is not None:
        defer_sync.add(fd, path)
        return
    try:
        _fsync(fd, path)
    finally:
        os.close(fd)


def open_new(path: str) -> int:
    """A descriptor for writing ``path``, which must not exist yet."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise CheckpointError(f"cannot create {path}: {e.strerror or e} (errno {e.errno})") from e


def _fsync(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        raise CheckpointError(f"fsync of {path} failed: {e.strerror or e} (errno {e.errno})") from e


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        _fsync(fd, path)
    finally:
        os.close(fd)


def write_json_file(path: str, obj: Any, *, defer_sync: Optional[DeferredSync] = None) -> tuple[int, int]:
    """Write ``obj`` as JSON (strict: no NaN) to a new file and fsync it (or defer that, as in
    ``write_safetensors``). Returns (size, CRC-32)."""
    data = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")
    fd = open_new(path)
    try:
        write_all(fd, data, path)
    except BaseException:
        os.close(fd)
        raise
    finish(fd, path, defer_sync)
    return len(data), crc32(data)


def check_size(path: str, size: int, expected: Optional[tuple[int, int]]) -> None:
    """Raise unless ``size`` is the size in ``expected`` (size, CRC-32); no check without it."""
    if expected is not None and size != expected[0]:
        raise CheckpointError(f"{path} is {size} bytes, the manifest says {expected[0]}: truncated or overwritten")


def open_regular(path: str):
    """``path`` opened for reading (unbuffered), if it is a regular file. The open does not block
    (O_NONBLOCK), so a FIFO is refused instead of waiting for a writer forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb", buffering=0)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes, what: str) -> Any:
    """``data`` parsed as strict JSON (no NaN or Infinity, as the writer writes it); CheckpointError
    naming ``what`` if it is not (or nests too deeply for the parser)."""
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{what} is not valid JSON: {e}") from e


def read_json_file(path: str, expected: Optional[tuple[int, int]] = None) -> Any:
    """Parse a JSON file, verifying (size, CRC-32) when ``expected`` is given. Without it (a
    manifest, a rank's sums) the file may hold at most ``_UNVOUCHED_JSON_MAX`` bytes."""
    with open_regular(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            check_size(path, size, expected)
            if expected is None and size > _UNVOUCHED_JSON_MAX:
                raise CheckpointError(f"{path} is {size} bytes: too large for a manifest")
            data = f.readall()
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    check_size(path, len(data), expected)
    if expected is not None and crc32(data) != expected[1]:
        raise CheckpointError(f"{path} fails its checksum (CRC-32 {crc32(data):08x}, "
                              f"manifest {expected[1]:08x}): the file is corrupt")
    return parse_json(data, path)
