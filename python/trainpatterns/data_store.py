"""On-disk array stores: a map-style dataset written once into one flat file per field, opened later
as ``np.memmap``s that ``PrefetchLoader`` gathers at native speed (``PrefetchLoader.from_store``).

This is FFCV's idea without its format. A store is a directory holding ``manifest.json`` (format
name and version, number of rows, the item structure, and per field its key, file, dtype and row
shape) and one raw row-major file per field. Items are tensors, arrays or numbers of a fixed shape
and dtype, or a flat dict (string keys), tuple or list of them; batches from the store come back
in the item's structure, as ``default_collate`` stacks them (Python ints as int64, floats as
float64, bools as bool).

Writing reads items in chunks of rows in ``num_workers`` processes (``__getitem__`` is Python and
holds the GIL, so threads would take turns), and each worker writes its chunk in place
(``os.pwrite``). The store is built under a temporary name beside ``path`` and renamed into place
only once every file is complete and synced, so an interrupted conversion never leaves a directory
that opens as a store.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ._loader_args import check_int

__all__ = ["open_array_store", "write_array_store"]

FORMAT = "trainpatterns.array_store"
VERSION = 1
MANIFEST = "manifest.json"
# Field dtypes: what the loader serves. bfloat16 has no numpy dtype, so its file holds the raw
# 16-bit words and is read through a torch view.
_DTYPES = {name: np.dtype(name) for name in
           ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")}
_DTYPES["bfloat16"] = np.dtype(np.uint16)
# Every item's every field is looked up here: dict lookups, as numpy's dtype.name is slow.
_NUMPY_NAMES = {dtype: name for name, dtype in _DTYPES.items() if name != "bfloat16"}
_TORCH_NAMES = {getattr(torch, name): name for name in _DTYPES}
_CHUNK_BYTES = 16 << 20  # one chunk's buffers: big enough for few writes, small enough to keep in cache


def _leaf(value: Any) -> tuple[str, np.ndarray]:
    """(dtype name, array) of one field value; TypeError names what is wrong (the caller adds which
    item and field)."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        name = _TORCH_NAMES.get(t.dtype)
        if name is None:
            raise TypeError(f"dtype {t.dtype} is not one the loader serves ({', '.join(_DTYPES)})")
        t = t.cpu()
        if name == "bfloat16":
            return name, t.view(torch.int16).numpy().view(np.uint16)
        return name, t.numpy()
    if isinstance(value, bool):
        value = np.asarray(value, dtype=np.bool_)
    elif isinstance(value, int):
        value = np.asarray(value, dtype=np.int64)
    elif isinstance(value, float):
        value = np.asarray(value, dtype=np.float64)
    elif isinstance(value, np.generic):
        value = np.asarray(value)
    elif not isinstance(value, np.ndarray):
        raise TypeError(f"is a {type(value).__name__}; fields must be tensors, numpy arrays or numbers")
    # A byte-swapped array holds the same values: the chunk buffer's assignment swaps them.
    name = _NUMPY_NAMES.get(value.dtype) or _NUMPY_NAMES.get(value.dtype.newbyteorder("="))
    if name is None:
        raise TypeError(f"dtype {value.dtype} is not one the loader serves ({', '.join(_DTYPES)})")
    return name, value


def _fields(item: Any) -> tuple[str, list, list]:
    """(structure kind, keys or None, values) of one item."""
    if isinstance(item, (tuple, list)):
        return ("tuple" if isinstance(item, tuple) else "list"), None, list(item)
    if isinstance(item, Mapping):
        keys = list(item.keys())
        bad = [k for k in keys if not isinstance(k, str)]
        if bad:
            raise TypeError(f"dict items need string keys (they name the fields in the manifest), got {bad[0]!r}")
        return "dict", keys, [item[k] for k in keys]
    return "single", None, [item]


def _field_names(keys: Optional[list], count: int) -> list:
    """How errors name the fields: as the loader names its sources (repr of a key, else the index)."""
    return [repr(k) for k in keys] if keys is not None else [str(i) for i in range(count)]


class _Schema:
    """The structure, field names, dtypes and row shapes every item must have (item 0's)."""

    def __init__(self, kind: str, keys: Optional[list], dtypes: list, shapes: list):
        self.kind, self.keys, self.dtypes, self.shapes = kind, keys, dtypes, shapes
        self.names = _field_names(keys, len(dtypes))
        self.row_bytes = [int(np.prod(s, dtype=np.int64)) * _DTYPES[d].itemsize for d, s in zip(dtypes, shapes)]

    @classmethod
    def of_item(cls, item: Any) -> "_Schema":
        kind, keys, values = _fields(item)
        if not values:
            raise ValueError("dataset[0] is empty: items need at least one field")
        dtypes, shapes = [], []
        for name, value in zip(_field_names(keys, len(values)), values):
            try:
                dtype, arr = _leaf(value)
            except TypeError as e:
                raise TypeError(f"dataset[0] field {name}: {e}") from None
            if arr.size == 0:
                raise ValueError(f"dataset[0] field {name} has shape {arr.shape}, with no elements: a store "
                                 f"row needs at least one byte")
            dtypes.append(dtype)
            shapes.append(tuple(int(s) for s in arr.shape))
        return cls(kind, keys, dtypes, shapes)

    def leaves(self, index: int, item: Any) -> list:
        """Item ``index``'s field arrays, checked against the schema."""
        kind, keys, values = _fields(item)
        if kind == "dict" and self.kind == "dict" and keys != self.keys and set(keys) == set(self.keys):
            keys, values = self.keys, [item[k] for k in self.keys]  # the same fields in another order
        if kind != self.kind or keys != self.keys or len(values) != len(self.dtypes):
            got = f"{kind} with keys {keys}" if keys is not None else f"{kind} of {len(values)} fields"
            want = f"{self.kind} with keys {self.keys}" if self.keys is not None else \
                f"{self.kind} of {len(self.dtypes)} fields"
            raise ValueError(f"dataset[{index}] is a {got}, but dataset[0] is a {want}")
        out = []
        for name, dtype, shape, value in zip(self.names, self.dtypes, self.shapes, values):
            try:
                got_dtype, arr = _leaf(value)
            except TypeError as e:
                raise TypeError(f"dataset[{index}] field {name}: {e}") from None
            if got_dtype != dtype or arr.shape != shape:
                raise ValueError(f"dataset[{index}] field {name} has dtype {got_dtype} and shape {tuple(arr.shape)}, "
                                 f"but dataset[0]'s has dtype {dtype} and shape {shape}: every item needs the "
                                 f"same shape and dtype per field")
            out.append(arr)
        return out

    def manifest(self, num_rows: int) -> dict:
        return dict(format=FORMAT, version=VERSION, num_rows=num_rows, structure=self.kind, fields=[
            dict(key=None if self.keys is None else self.keys[i], file=_file_name(i), dtype=self.dtypes[i],
                 shape=list(self.shapes[i])) for i in range(len(self.dtypes))])


def _file_name(i: int) -> str:
    return f"field{i}.bin"


class _ChunkWriter:
    """Reads a chunk of rows from the dataset and writes each field's rows at their place in its file."""

    def __init__(self, dataset: Any, schema: _Schema, directory: str):
        self.dataset, self.schema = dataset, schema
        flags = os.O_WRONLY | getattr(os, "O_BINARY", 0)
        self.fds = [os.open(os.path.join(directory, _file_name(i)), flags) for i in range(len(schema.dtypes))]

    def __call__(self, chunk: tuple[int, int]) -> int:
        lo, hi = chunk
        s = self.schema
        bufs = [np.empty((hi - lo, *shape), dtype=_DTYPES[d]) for d, shape in zip(s.dtypes, s.shapes)]
        for i in range(lo, hi):
            try:
                item = self.dataset[i]
            except Exception as e:
                raise RuntimeError(f"dataset[{i}] raised {type(e).__name__}: {e}") from e
            for buf, arr in zip(bufs, s.leaves(i, item)):
                buf[i - lo] = arr
        for fd, buf, row_bytes in zip(self.fds, bufs, s.row_bytes):
            view, offset = memoryview(buf).cast("B"), lo * row_bytes
            while view:  # a write may take less than asked
                done = _write_at(fd, view, offset)
                view, offset = view[done:], offset + done
        return hi - lo

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


_WORKER: Optional[_ChunkWriter] = None  # a conversion worker process's writer


def _init_worker(dataset: Any, schema: _Schema, directory: str) -> None:
    global _WORKER
    torch.set_num_threads(1)  # the workers are the parallelism, as in DataLoader's workers
    _WORKER = _ChunkWriter(dataset, schema, directory)


def _write_chunk(chunk: tuple[int, int]) -> int:
    return _WORKER(chunk)


def _write_at(fd: int, data: memoryview, offset: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows: no pwrite, and each worker process has its own descriptors
    return os.write(fd, data)


def _is_store(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _fsync(path: Union[str, Path]) -> None:
    if os.name == "nt" and os.path.isdir(path):
        return  # Windows cannot open a directory to sync it
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chunks(num_rows: int, row_bytes: int, workers: int) -> list:
    rows = max(1, min(_CHUNK_BYTES // max(1, row_bytes), 4096, -(-num_rows // (4 * max(1, workers)))))
    return [(lo, min(num_rows, lo + rows)) for lo in range(0, num_rows, rows)]


def write_array_store(dataset: Any, path: Union[str, os.PathLike], *, num_workers: Optional[int] = None,
                      progress: bool = True, overwrite: bool = False) -> Path:
    """Write a map-style dataset into an array store at ``path`` (a new directory); returns the path.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__`` over ``0 .. len-1``, such as a
            ``torch.utils.data.Dataset``) whose items are tensors, numpy arrays or numbers of one
            fixed shape and dtype, or a flat dict (string keys), tuple or list of them.
        path: the store's directory; it must not exist, unless ``overwrite`` and it is an array store.
        num_workers: processes reading items (default: the cores, at most 8); 0 reads in this
            process. The dataset reaches them by ``fork`` where that is the start method, else it
            must be picklable.
        progress: show a tqdm bar of rows written.
        overwrite: replace an existing array store at ``path`` (never any other directory).

    Raises TypeError for an iterable-style dataset or an item field of an unsupported type,
    ValueError for an empty dataset or an item whose structure, dtype or shape differs from item
    0's (naming the index and field), FileExistsError for an existing ``path``.
    """
    if isinstance(dataset, torch.utils.data.IterableDataset) or not (hasattr(dataset, "__len__")
                                                                       and hasattr(dataset, "__getitem__")):
        raise TypeError(f"write_array_store needs a map-style dataset (__len__ and __getitem__ by index), got "
                        f"{type(dataset).__name__}")
    num_rows = check_int("len(dataset)", len(dataset), 0)
    if num_rows == 0:
        raise ValueError("the dataset is empty: an array store needs at least one row")
    workers = min(8, os.cpu_count() or 1) if num_workers is None else check_int("num_workers", num_workers, 0)
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace an array store there")
        if not _is_store(path):
            raise FileExistsError(f"{path} exists and is not an array store: refusing to replace it")
    schema = _Schema.of_item(dataset[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        for i, row_bytes in enumerate(schema.row_bytes):
            with open(tmp / _file_name(i), "wb") as f:
                f.truncate(num_rows * row_bytes)
        _fill(dataset, schema, tmp, num_rows, workers, progress)
        for i in range(len(schema.row_bytes)):
            _fsync(tmp / _file_name(i))
        with open(tmp / MANIFEST, "w") as f:
            json.dump(schema.manifest(num_rows), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _fill(dataset: Any, schema: _Schema, directory: Path, num_rows: int, workers: int, progress: bool) -> None:
    chunks = _chunks(num_rows, sum(schema.row_bytes), workers)
    with tqdm(total=num_rows, unit="row", desc="array store", disable=not progress, dynamic_ncols=True) as bar:
        if workers == 0:
            writer = _ChunkWriter(dataset, schema, str(directory))
            try:
                for chunk in chunks:
                    bar.update(writer(chunk))
            finally:
                writer.close()
            return
        pool = multiprocessing.get_context().Pool(min(workers, len(chunks)), initializer=_init_worker,
                                                  initargs=(dataset, schema, str(directory)))
        try:
            for rows in pool.imap_unordered(_write_chunk, chunks):
                bar.update(rows)
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.close()
            pool.join()


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished store to ``path``; an old store there is moved aside first and deleted."""
    old = None
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync(path.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def open_array_store(path: Union[str, os.PathLike]) -> Union[dict, tuple, list, np.ndarray, torch.Tensor]:
    """The fields of the array store at ``path``, in the items' structure, as read-only ``np.memmap``s
    (a bfloat16 field as a torch view of its map): what ``PrefetchLoader`` (or the Trainer) takes.

    Raises FileNotFoundError when ``path`` holds no manifest or a field's file, ValueError when the
    manifest is corrupt or a file's size does not match it."""
    path = Path(path)
    where = path / MANIFEST
    if not where.is_file():
        raise FileNotFoundError(f"no array store at {path}: {MANIFEST} is missing (write one with "
                                f"trainpatterns.data.write_array_store)")
    try:
        m = json.loads(where.read_text())
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise ValueError(f"it is not an array store manifest (format {FORMAT!r})")
        if m.get("version") != VERSION:
            raise ValueError(f"format version {m.get('version')!r} is not {VERSION}, the one this library reads")
        num_rows, kind, fields = m["num_rows"], m["structure"], m["fields"]
        if not isinstance(num_rows, int) or isinstance(num_rows, bool) or num_rows < 1:
            raise ValueError(f"num_rows {num_rows!r} is not a positive int")
        if kind not in ("dict", "tuple", "list", "single") or not isinstance(fields, list) or not fields \
                or (kind == "single" and len(fields) != 1):
            raise ValueError(f"structure {kind!r} with {fields!r} is not a valid layout")
        specs = [(f["key"], f["file"], f["dtype"], tuple(f["shape"])) for f in fields]
        for key, file, dtype, shape in specs:
            if dtype not in _DTYPES or not all(isinstance(s, int) and s > 0 for s in shape) \
                    or not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", "..") \
                    or (kind == "dict") != isinstance(key, str):
                raise ValueError(f"field {key!r}: file {file!r}, dtype {dtype!r}, shape {shape!r} is not valid")
    except (ValueError, KeyError, TypeError) as e:
        detail = f"missing entry {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"corrupt array store manifest {where}: {detail}") from None
    arrays = [_open_field(path / file, dtype, shape, num_rows) for _, file, dtype, shape in specs]
    if kind == "dict":
        return {key: a for (key, _, _, _), a in zip(specs, arrays)}
    if kind == "single":
        return arrays[0]
    return tuple(arrays) if kind == "tuple" else arrays


def _open_field(file: Path, dtype: str, shape: tuple, num_rows: int) -> Union[np.ndarray, torch.Tensor]:
    expected = num_rows * int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
    try:
        size = os.stat(file).st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"array store file {file} is missing") from None
    if size != expected:
        raise ValueError(f"array store file {file} has {size} bytes, but the manifest says {num_rows} rows of "
                         f"{dtype} {list(shape)}, {expected} bytes: the store is damaged")
    if dtype != "bfloat16":
        return np.memmap(file, dtype=_DTYPES[dtype], mode="r", shape=(num_rows, *shape))
    # Copy-on-write: torch wants a writable array; nothing here writes to it.
    words = np.memmap(file, dtype=np.uint16, mode="c", shape=(num_rows, *shape))
    return torch.from_numpy(words.view(np.int16)).view(torch.bfloat16)
