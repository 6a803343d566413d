"""The on-disk format of a checkpoint: a JSON codec for state trees and a safetensors reader/writer.

Why our own code: a checkpoint must load without unpickling anything (so an untrusted one cannot run
code), and the write must go straight from the host snapshot to the file (one pass, checksummed as it
goes), and the read straight from the file into tensors (one copy, as ``torch.load``).

State trees (what ``state_dict()`` returns: nested dicts, lists, tuples, tensors, numbers) become
JSON where every tensor is replaced by a reference to a named tensor in a safetensors file. Values
JSON cannot hold exactly are tagged with a one-key object whose key starts with ``$``::

    {"$tensor": "state.0.exp_avg", "device": "cuda:0"}   a tensor (bytes, dtype, shape in the file)
    {"$tuple": [...]}              a tuple (e.g. Adam's betas)
    {"$dict": [[key, value], ...]} a dict whose keys are not all strings, or start with "$"
    {"$float": "inf" | "-inf" | "nan"}
    {"$ndarray": name}  {"$np": "float64", "value": 1.5}   numpy arrays and scalars
    {"$dtype": "float32"}  {"$device": "cuda:0"}  {"$bytes": "<base64>"}

Everything else (None, bool, int, finite float, str, list, dict with plain string keys) is plain
JSON, so ints stay ints, floats round-trip bit for bit (``repr``), key order is kept.

safetensors files follow https://github.com/huggingface/safetensors: 8-byte little-endian header
length, a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}`` padded
with spaces to a multiple of 8, then the tensors' bytes back to back. We write tensors largest
element size first, so every tensor starts at an offset aligned to its element size (the official
writer does the same), which lets the reader fill each tensor in place.

Checksums: a CRC-32 (zlib's polynomial) over every byte of a file, computed on one helper thread
while the writing (or reading) thread moves the next chunk. The CRC comes from ``isal`` (ISA-L) or
``zlib_ng`` when one is installed (``pip install trainpatterns[checkpoint]``: 3-4x faster than zlib
here, which matters on restore), else from ``zlib``; all give the same value and release the GIL.
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import math
import mmap
import os
import queue
import threading
import zlib
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["CheckpointError", "crc32", "DeferredSync", "encode_tree", "decode_tree", "write_safetensors", "read_safetensors",
           "write_json_file", "read_json_file", "fsync_dir", "Crc32"]


def _pick_crc32():
    for module, attr in (("isal.isal_zlib", "crc32"), ("zlib_ng.zlib_ng", "crc32")):
        try:
            return getattr(__import__(module, fromlist=[attr]), attr)
        except ImportError:
            continue
    return zlib.crc32


crc32 = _pick_crc32()  # crc32(buffer, value=0) -> int, same results as zlib.crc32


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or trusted (missing, corrupt, truncated, incompatible)."""


# --------------------------------------------------------------------------------------------------
# tree codec

_DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                   ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPE_TO_ST[getattr(torch, _name)] = _st
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}


def _path_str(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path)


class TensorSink:
    """Collects the tensors met while encoding one file's trees, naming each by its path."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, path: tuple, t: torch.Tensor, where: str) -> str:
        if t.dtype not in _DTYPE_TO_ST:
            raise TypeError(f"{where}{_path_str(path)}: tensors of dtype {t.dtype} cannot be saved "
                            f"(safetensors holds {sorted(str(d) for d in _DTYPE_TO_ST)})")
        if t.layout != torch.strided:
            raise TypeError(f"{where}{_path_str(path)}: only dense (strided) tensors can be saved, "
                            f"got layout {t.layout}")
        base = ".".join(str(k) for k in path) or "_"
        name, n = base, 1
        while name in self.tensors:
            name, n = f"{base}#{n}", n + 1
        self.tensors[name] = t
        return name


def encode_tree(value: Any, sink: TensorSink, where: str, path: tuple = ()) -> Any:
    """A JSON-able copy of ``value``; tensors go to ``sink``. ``where`` names the entry in errors."""
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return {"$np": value.dtype.str, "value": encode_tree(value.item(), sink, where, path)}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # IntEnum and friends become plain ints
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, torch.Tensor):
        return {"$tensor": sink.add(path, value, where), "device": str(value.device)}
    if isinstance(value, tuple):
        return {"$tuple": [encode_tree(v, sink, where, path + (i,)) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_tree(v, sink, where, path + (i,)) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode_tree(v, sink, where, path + (k,)) for k, v in value.items()}
        return {"$dict": [[encode_tree(k, sink, where, path + ("<key>",)), encode_tree(v, sink, where, path + (k,))]
                          for k, v in value.items()]}
    if isinstance(value, np.ndarray):
        try:
            t = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as e:
            raise TypeError(f"{where}{_path_str(path)}: numpy array of dtype {value.dtype} cannot be saved") from e
        return {"$ndarray": sink.add(path, t, where)}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"{where}{_path_str(path)}: cannot save a value of type {type(value).__qualname__}; "
                    "checkpoints hold tensors, numpy arrays, None, bool, int, float, str, bytes, "
                    "torch.dtype/device and lists, tuples, dicts of these (nothing is pickled)")


def _device_available(device: str) -> bool:
    d = torch.device(device)
    if d.type == "cpu":
        return True
    if d.type == "cuda":
        return torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count()
    mod = getattr(torch, d.type, None)
    return bool(mod is not None and getattr(mod, "is_available", lambda: False)())


def decode_tree(node: Any, tensors: dict[str, torch.Tensor], live: Any = None, where: str = "") -> Any:
    """The value ``encode_tree`` encoded. Tensors go to the device of the tensor at the same place in
    ``live`` (the object's current state), else to the device they were saved from when it exists
    here, else stay on the CPU."""
    if isinstance(node, list):
        return [decode_tree(v, tensors, _child(live, i), where) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if len(node) >= 1 and all(isinstance(k, str) for k in node) and any(k.startswith("$") for k in node):
        tag = next(k for k in node if k.startswith("$"))
        arg = node[tag]
        if tag == "$tensor":
            t = _lookup(tensors, arg, where)
            if isinstance(live, torch.Tensor):
                device = live.device
            else:
                saved = node.get("device", "cpu")
                device = torch.device(saved if _device_available(saved) else "cpu")
            return t if t.device == device else t.to(device)
        if tag == "$ndarray":
            return _lookup(tensors, arg, where).numpy()
        if tag == "$tuple":
            return tuple(decode_tree(v, tensors, _child(live, i), where) for i, v in enumerate(arg))
        if tag == "$dict":
            out = {}
            for k, v in arg:
                key = decode_tree(k, tensors, None, where)
                out[key] = decode_tree(v, tensors, _child(live, key), where)
            return out
        if tag == "$float":
            return float(arg)
        if tag == "$np":
            return np.dtype(arg).type(decode_tree(node["value"], tensors, None, where))
        if tag == "$dtype":
            return getattr(torch, arg)
        if tag == "$device":
            return torch.device(arg)
        if tag == "$bytes":
            return base64.b64decode(arg)
        raise CheckpointError(f"{where}: unknown tag {tag!r} in the checkpoint (written by a newer version?)")
    return {k: decode_tree(v, tensors, _child(live, k), where) for k, v in node.items()}


def _child(live: Any, key: Any) -> Any:
    try:
        if isinstance(live, dict):
            return live.get(key)
        if isinstance(live, (list, tuple)) and isinstance(key, int) and 0 <= key < len(live):
            return live[key]
    except TypeError:  # an unhashable key
        pass
    return None


def _lookup(tensors: dict, name: str, where: str) -> torch.Tensor:
    try:
        return tensors[name]
    except KeyError:
        raise CheckpointError(f"{where}: tensor {name!r} is referenced but missing from the checkpoint") from None


# --------------------------------------------------------------------------------------------------
# checksums

class _HashThread:
    """One daemon thread that runs CRC-32 jobs in submission order. Our own rather than a
    ThreadPoolExecutor, because executors refuse work once interpreter shutdown has begun, and the
    exit handler still has to finish a pending checkpoint."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="trainpatterns-crc", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            buf, prev, fut = self._jobs.get()
            try:
                fut.set_result(crc32(buf, 0 if prev is None else prev.result()))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the value
                fut.set_exception(e)

    def submit(self, buf, prev: Optional[concurrent.futures.Future]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((buf, prev, fut))
        return fut


_hasher: Optional[_HashThread] = None
_hasher_lock = threading.Lock()


def _hash_thread() -> _HashThread:
    global _hasher
    with _hasher_lock:
        if _hasher is None:
            _hasher = _HashThread()
        return _hasher


def _reset_hasher_after_fork() -> None:
    """A forked child has none of the parent's threads: it starts its own hasher when needed."""
    global _hasher, _hasher_lock
    _hasher, _hasher_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_hasher_after_fork)


class Crc32:
    """CRC-32 of a byte stream fed in order, computed on a helper thread (one worker, so chunks are
    hashed in the order given). Buffers must stay unchanged until :meth:`value` returns."""

    def __init__(self) -> None:
        self._last: Optional[concurrent.futures.Future] = None

    def update(self, buf) -> None:
        self._last = _hash_thread().submit(buf, self._last)

    def value(self) -> int:
        return 0 if self._last is None else self._last.result()


# --------------------------------------------------------------------------------------------------
# files

_CHUNK = 32 << 20  # bytes per write/read call: large enough for disk speed, small enough to pipeline hashing
_SMALL = 1 << 16  # tensors below this size are gathered into one buffer before writing
_PIECE = 1 << 20  # bytes copied then hashed at a time on restore: small enough to stay in L2


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _write_all(fd: int, buf, path: str) -> None:
    view = memoryview(buf)
    while len(view):
        try:
            n = os.write(fd, view)
        except OSError as e:
            raise CheckpointError(f"writing {path} failed: {e.strerror or e} (errno {e.errno})") from e
        view = view[n:]


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                      defer_sync: Optional["DeferredSync"] = None) -> tuple[int, int]:
    """Write contiguous CPU tensors as one safetensors file at ``path`` (which must not exist) and
    fsync it, or with ``defer_sync`` leave it open there to be fsynced later. Returns (size in
    bytes, CRC-32 of the file)."""
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    crc = Crc32()
    staging = bytearray(len(head).to_bytes(8, "little") + head)
    fd = _open_new(path)
    try:
        for name in order:
            view = _bytes_view(tensors[name])
            if len(view) < _SMALL:
                staging += view
                if len(staging) >= _CHUNK:
                    crc.update(staging)
                    _write_all(fd, staging, path)
                    staging = bytearray()
                continue
            if staging:
                crc.update(staging)
                _write_all(fd, staging, path)
                staging = bytearray()
            for s in range(0, len(view), _CHUNK):
                piece = view[s:s + _CHUNK]
                crc.update(piece)
                _write_all(fd, piece, path)
        if staging:
            crc.update(staging)
            _write_all(fd, staging, path)
    except BaseException:
        os.close(fd)
        raise
    _finish(fd, path, defer_sync)
    return 8 + len(head) + offset, crc.value()


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


def _finish(fd: int, path: str, defer_sync: Optional[DeferredSync]) -> None:
    if defer_sync is not None:
        defer_sync.add(fd, path)
        return
    try:
        _fsync(fd, path)
    finally:
        os.close(fd)


def _open_new(path: str) -> int:
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
    :func:`write_safetensors`). Returns (size, CRC-32)."""
    data = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")
    fd = _open_new(path)
    try:
        _write_all(fd, data, path)
    except BaseException:
        os.close(fd)
        raise
    _finish(fd, path, defer_sync)
    return len(data), crc32(data)


def _check_file(path: str, size: int, expected: Optional[tuple[int, int]]) -> None:
    if expected is not None and size != expected[0]:
        raise CheckpointError(f"{path} is {size} bytes, the manifest says {expected[0]}: truncated or overwritten")


def read_json_file(path: str, expected: Optional[tuple[int, int]] = None) -> Any:
    """Parse a JSON file, verifying (size, CRC-32) when ``expected`` is given."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    _check_file(path, len(data), expected)
    if expected is not None and crc32(data) != expected[1]:
        raise CheckpointError(f"{path} fails its checksum (CRC-32 {crc32(data):08x}, "
                              f"manifest {expected[1]:08x}): the file is corrupt")
    try:
        return json.loads(data)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


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
        _check_file(path, size, expected)
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
