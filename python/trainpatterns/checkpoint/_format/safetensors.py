"""safetensors files: write CPU tensors straight from host memory, read them straight into tensors.

Why our own code: a checkpoint must load without unpickling anything (so an untrusted one cannot run
code), and the write must go straight from the host snapshot to the file (one pass, checksummed as it
goes), and the read straight from the file into tensors (one copy, as ``torch.load``).

The files follow https://github.com/huggingface/safetensors: 8-byte little-endian header length, a
JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}`` padded with spaces
to a multiple of 8, then the tensors' bytes back to back. We write tensors largest element size
first, so every tensor starts at an offset aligned to its element size (the official writer does the
same), which lets the reader fill each tensor in place.
"""
from __future__ import annotations

import json
import math
import mmap
import os
from typing import Any, Optional

import torch

from .checksum import Crc32, crc32
from .errors import CheckpointError
from .files import DeferredSync, check_size, finish, open_new, write_all

__all__ = ["DTYPE_TO_ST", "write_safetensors", "read_safetensors"]

DTYPE_TO_ST = {  # torch dtype -> safetensors dtype name: the dtypes a checkpoint can hold
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                   ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPE_TO_ST[getattr(torch, _name)] = _st
_ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}

_CHUNK = 32 << 20  # bytes per write/read call: large enough for disk speed, small enough to pipeline hashing
_SMALL = 1 << 16  # tensors below this size are gathered into one buffer before writing
_PIECE = 1 << 20  # bytes copied then hashed at a time on restore: small enough to stay in L2


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                      defer_sync: Optional[DeferredSync] = None) -> tuple[int, int]:
    """Write contiguous CPU tensors as one safetensors file at ``path`` (which must not exist) and
    fsync it, or with ``defer_sync`` leave it open there to be fsynced later. Returns (size in
    bytes, CRC-32 of the file)."""
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    crc = Crc32()
    staging = bytearray(len(head).to_bytes(8, "little") + head)
    fd = open_new(path)
    try:
        for name in order:
            view = _bytes_view(tensors[name])
            if len(view) < _SMALL:
                staging += view
                if len(staging) >= _CHUNK:
                    crc.update(staging)
                    write_all(fd, staging, path)
                    staging = bytearray()
                continue
            if staging:
                crc.update(staging)
                write_all(fd, staging, path)
                staging = bytearray()
            for s in range(0, len(view), _CHUNK):
                piece = view[s:s + _CHUNK]
                crc.update(piece)
                write_all(fd, piece, path)
        if staging:
            crc.update(staging)
            write_all(fd, staging, path)
    except BaseException:
        os.close(fd)
        raise
    finish(fd, path, defer_sync)
    return 8 + len(head) + offset, crc.value()


def read_safetensors(path: str, expected: Optional[tuple[int, int]] = None, *,
                     copy: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file into CPU tensors; verify (size, CRC-32) when ``expected`` is given.
    Returns (tensors by name, metadata). Nothing is unpickled.

    The file is memory-mapped (private, copy-on-write). ``copy=True``: every tensor owns fresh
    memory, filled in pieces of ``_PIECE`` bytes, each hashed right after it is copied, while it is
    still in cache: one pass over memory, as a plain read would be. ``copy=False``: tensors are
    views of the mapping where the file's alignment allows (no copy at all), hashed on the helper
    thread; meant for values that are copied again right away, such as a module's state dict
    handed to ``load_state_dict``. The mapping lives as long as the views."""
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        check_size(path, size, expected)
        if size < 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file ({size} bytes)")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot map {path}: {e}") from e
    view = memoryview(mm)
    crc = Crc32()
    if not copy:
        for s in range(0, size, _CHUNK):
            crc.update(view[s:s + _CHUNK])
    hlen = int.from_bytes(view[:8], "little")
    if hlen > size - 8 or hlen > 100 << 20:
        raise CheckpointError(f"{path}: header length {hlen} is impossible for a {size}-byte file")
    try:
        header = json.loads(bytes(view[8:8 + hlen]))
    except ValueError as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + hlen
    out: dict[str, torch.Tensor] = {}
    pos = 0
    value = crc32(view[:base]) if copy else 0  # copy=True: the running CRC, in file order
    try:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _ST_TO_DTYPE.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
            shape = [int(x) for x in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
            itemsize = torch.empty((), dtype=dtype).element_size()
            numel = math.prod(shape)
            if begin != pos or end - begin != numel * itemsize or base + end > size:
                raise CheckpointError(f"{path}: tensor {name!r} has inconsistent data_offsets {info['data_offsets']}")
            pos = end
            if numel == 0:
                out[name] = torch.empty(shape, dtype=dtype)
            elif not copy and (base + begin) % itemsize == 0:
                out[name] = torch.frombuffer(mm, dtype=dtype, count=numel, offset=base + begin).view(shape)
            else:
                t = torch.empty(shape, dtype=dtype)
                dst = _bytes_view(t)
                src = view[base + begin:base + end]
                # memoryview assignment is one memcpy: no thread team per piece (torch's copy_ would
                # start one, which stalls badly when the machine is oversubscribed)
                for s in range(0, end - begin, _PIECE):
                    dst[s:s + _PIECE] = src[s:s + _PIECE]
                    if copy:
                        value = crc32(dst[s:s + _PIECE], value)
                out[name] = t
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header ({e!r})") from e
    if base + pos != size:
        raise CheckpointError(f"{path}: {size - base - pos} trailing bytes after the last tensor")
    if not copy:
        value = crc.value()
    if expected is not None and value != expected[1]:
        raise CheckpointError(f"{path} fails its checksum (CRC-32 {value:08x}, manifest {expected[1]:08x}): "
                              "the file is corrupt")
    return out, metadata
