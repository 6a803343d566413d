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

import itertools
import json
import math
import os
from typing import Any, Optional

import torch

from .checksum import Crc32, crc32, crc32_combine
from .errors import CheckpointError, brief
from .files import DeferredSync, check_size, finish, open_new, open_regular, parse_json, write_all
from .threads import chunks, run_split

__all__ = ["DTYPE_TO_ST", "MAX_DIMS", "write_safetensors", "read_safetensors"]

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
_PIECE = 1 << 20  # bytes read then hashed at a time on restore: small enough to stay in L2
_MAX_IOV = 512  # buffers per preadv call (Linux takes up to 1024)
_MAX_HEADER = 100 << 20  # bytes of JSON header a reader accepts
MAX_DIMS = 64  # dimensions of a tensor the format holds


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
    Returns (tensors by name, metadata). Nothing is unpickled, and every field of the header is
    checked (dtype, shape, offsets that tile the file exactly) before any tensor is allocated, so a
    hostile header is a CheckpointError naming the file, never a huge allocation or a torch error.

    The file is read, not memory-mapped: what is returned never depends on the file afterwards (a
    view of a mapping dies with SIGBUS once the file is truncated). Bytes go straight from the file
    into the tensors in pieces of ``_PIECE`` bytes, each hashed right after it is read, while it is
    still in cache: one pass over memory. A large file is read by a few threads at once, in chunks
    (``threads.run_split``) whose CRCs are then combined. ``copy=True``: every
    tensor owns its memory. ``copy=False``: the tensors are views of one buffer holding all of the
    file's tensor bytes (one allocation for any number of tensors; each keeps the whole buffer
    alive), for values used once, such as the weights of a warm start."""
    with open_regular(path) as f:
        try:
            return _read_open(f, path, expected, copy)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e


def _read_open(f, path: str, expected: Optional[tuple[int, int]], copy: bool) -> tuple[dict, dict]:
    size = os.fstat(f.fileno()).st_size
    check_size(path, size, expected)
    if size < 8:
        raise CheckpointError(f"{path} is too short to be a safetensors file ({size} bytes)")
    head = _read_exact(f, 8, path)
    hlen = int.from_bytes(head, "little")
    if hlen > size - 8 or hlen > _MAX_HEADER:
        raise CheckpointError(f"{path}: header length {hlen} is impossible for a {size}-byte file")
    raw = _read_exact(f, hlen, path)
    value = crc32(raw, crc32(head))
    entries, metadata = _parse_header(path, raw)
    data_bytes = entries[-1][4] if entries else 0
    if 8 + hlen + data_bytes != size:
        raise CheckpointError(f"{path}: the header describes {8 + hlen + data_bytes} bytes, the file has {size}")
    if copy:
        out = {name: torch.empty(shape, dtype=dtype) for name, dtype, shape, _, _ in entries}
        views = [_bytes_view(out[name]) for name, *_ in entries]
    else:
        out, buf = {}, torch.empty(data_bytes, dtype=torch.uint8)
        views = [_bytes_view(buf)]
    value = crc32_combine(value, _read_split(f.fileno(), views, 8 + hlen, path), data_bytes)
    if os.pread(f.fileno(), 1, size):
        raise CheckpointError(f"{path} grew while it was being read")
    if not copy:
        for name, dtype, shape, begin, end in entries:
            piece = buf[begin:end] if begin % dtype.itemsize == 0 else buf[begin:end].clone()
            out[name] = piece.view(dtype).view(shape)
    if expected is not None and value != expected[1]:
        raise CheckpointError(f"{path} fails its checksum (CRC-32 {value:08x}, manifest {expected[1]:08x}): "
                              "the file is corrupt")
    return out, metadata


def _read_exact(f, n: int, path: str) -> bytes:
    data = f.read(n) if n else b""
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            raise CheckpointError(f"{path} ended early: it was truncated while being read")
        data += more
    return data


def _read_split(fd: int, views: list, offset: int, path: str) -> int:
    """Fill ``views`` (writable byte views, back to back in the file from ``offset``) with the
    file's bytes, read as ``threads.chunks`` by a few threads at once; the CRC-32 of all the bytes
    read, from the chunks' CRCs."""
    pieces = chunks([len(v) for v in views])
    lengths = [sum(b - a for _, a, b in chunk) for chunk in pieces]
    starts = [offset + s for s in itertools.accumulate(lengths, initial=0)]
    crcs = run_split([lambda c=c, p=p: _read_chunk(fd, views, c, p, path) for c, p in zip(pieces, starts)])
    value = 0
    for crc, n in zip(crcs, lengths):
        value = crc32_combine(value, crc, n)
    return value


def _read_chunk(fd: int, views: list, chunk: list, pos: int, path: str) -> int:
    """Read one chunk (pieces (view index, start, end), contiguous in the file from ``pos``) with
    one ``preadv`` per ``_PIECE`` bytes, hashing each piece right after it lands, while it is still
    in cache; its CRC-32."""
    value = 0
    batch: list = []
    size = 0

    def flush() -> None:
        nonlocal value, pos, batch, size
        _preadv_all(fd, batch, pos, path)
        for piece in batch:
            value = crc32(piece, value)
        pos += size
        batch, size = [], 0

    for i, a, b in chunk:
        for s in range(a, b, _PIECE):
            piece = views[i][s:min(b, s + _PIECE)]
            if batch and (size + len(piece) > _PIECE or len(batch) == _MAX_IOV):
                flush()
            batch.append(piece)
            size += len(piece)
    if batch:
        flush()
    return value


def _preadv_all(fd: int, bufs: list, pos: int, path: str) -> None:
    """Fill every buffer of ``bufs`` from the file at ``pos`` (``preadv`` may read fewer bytes)."""
    while bufs:
        n = os.preadv(fd, bufs, pos)
        if not n:
            raise CheckpointError(f"{path} ended early: it was truncated while being read")
        pos += n
        k = 0
        while k < len(bufs) and n >= len(bufs[k]):
            n -= len(bufs[k])
            k += 1
        bufs = bufs[k:]
        if n:
            bufs = [bufs[0][n:]] + bufs[1:]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(path: str, raw: bytes) -> tuple[list, dict]:
    """[(name, dtype, shape, begin, end)] in file order, and the metadata, from a header's JSON; the
    entries are checked to tile the data section exactly, in order, with no gap."""
    header = parse_json(raw, f"{path}: the safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings")
    entries = sorted((_parse_entry(path, name, info) for name, info in header.items()), key=lambda e: (e[3], e[4]))
    pos = 0
    for name, dtype, shape, begin, end in entries:
        if begin != pos or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has inconsistent data_offsets {[begin, end]} "
                                  f"(expected [{pos}, {pos + math.prod(shape) * dtype.itemsize}])")
        pos = end
    return entries, metadata


def _parse_entry(path: str, name: str, info: Any) -> tuple:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: expected {{dtype, shape, data_offsets}}, got {brief(info)}")
    st = info.get("dtype")
    dtype = _ST_TO_DTYPE.get(st) if isinstance(st, str) else None
    if dtype is None:
        raise CheckpointError(f"{where} has unsupported dtype {brief(st)}")
    shape = info.get("shape")
    # every dim >= 0 and the product of the non-zero ones below 2**62: torch's stride arithmetic
    # (int64) cannot overflow, even for an empty tensor
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape)
            or math.prod(max(d, 1) for d in shape) >= 1 << 62):
        raise CheckpointError(f"{where} has an invalid shape {brief(shape)}")
    offsets = info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) and x >= 0 for x in offsets)):
        raise CheckpointError(f"{where} has invalid data_offsets {brief(offsets)}")
    return name, dtype, shape, offsets[0], offsets[1]
