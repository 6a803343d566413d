"""State trees as JSON: what ``state_dict()`` returns, encoded without pickle, tensors by reference.

State trees (nested dicts, lists, tuples, tensors, numbers) become JSON where every tensor is replaced
by a reference to a named tensor in a safetensors file. Values JSON cannot hold exactly are tagged
with a one-key object whose key starts with ``$``::

    {"$tensor": "state.0.exp_avg", "device": "cuda:0"}   a tensor (bytes, dtype, shape in the file)
    {"$tuple": [...]}              a tuple (e.g. Adam's betas)
    {"$dict": [[key, value], ...]} a dict whose keys are not all strings, or start with "$"
    {"$float": "inf" | "-inf" | "nan"}
    {"$ndarray": name}  {"$np": "float64", "value": 1.5}   numpy arrays and scalars
    {"$dtype": "float32"}  {"$device": "cuda:0"}  {"$bytes": "<base64>"}

Everything else (None, bool, int, finite float, str, list, dict with plain string keys) is plain
JSON, so ints stay ints, floats round-trip bit for bit (``repr``), key order is kept. Trees nest at
most ``MAX_DEPTH`` containers deep.

Tensors that are one tensor under several names (tied weights: ``lm_head.weight is embed.weight``,
or any two views of the same bytes with the same shape and strides) are stored once: every place
refers to the first name, and the decoder gives every place the same tensor object again. The
other names are recorded in ``TensorSink.aliases`` (name -> the stored name), which the writer puts
in the file's metadata as safetensors' ``save_model`` does.

Decoding only ever builds these types, from closed tables: a dtype is one of ``DTYPES`` (never an
attribute looked up by name), a numpy scalar one of the plain kinds, a device a parsed device
string. Every node that is not exactly what the encoder writes is a CheckpointError naming the
file and the place, so an untrusted checkpoint can neither run code nor reach anything by name.
"""
from __future__ import annotations

import base64
import math
import re
from typing import Any, NoReturn, Optional

import numpy as np
import torch

from .errors import CheckpointError, brief
from .safetensors import DTYPE_TO_ST, MAX_DIMS

__all__ = ["TensorSink", "encode_tree", "decode_tree", "storage_key", "DTYPES", "MAX_DEPTH"]

MAX_DEPTH = 100  # containers inside containers: far beyond any state_dict, far below Python's recursion limit
# The dtypes a {"$dtype": name} may name (a value such as an AMP dtype, not a tensor's dtype):
# torch's dtypes by their canonical names, those this torch has.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in (
        "float64", "float32", "float16", "bfloat16", "complex32", "complex64", "complex128",
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
        "qint8", "quint8", "qint32", "quint4x2", "quint2x4")
    if isinstance(getattr(torch, name, None), torch.dtype) and str(getattr(torch, name)) == f"torch.{name}"
}
_NP_KINDS = "biufmMUS"  # numpy scalars: bool, ints, floats, datetimes, str, bytes (never object or void)
_NP_DTYPE = re.compile(r"^[<>|=]?([biuf]\d{1,2}|[US]\d{1,9}|[mM]8(\[\d{0,9}[A-Za-z]{1,2}\])?)$")  # dtype.str of those
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_EXTRA_KEYS = {"$tensor": {"device"}, "$np": {"value"}}  # keys beside the tag in a tagged node
_ACCELERATORS = ("mps", "xpu")  # device types besides cpu and cuda that a tensor may be restored to


def _path_str(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path)


def storage_key(t: torch.Tensor) -> Optional[tuple]:
    """What makes two tensor objects the same tensor: the same bytes (device, storage address,
    offset) seen with the same dtype, shape and strides. None for a tensor without bytes of its own
    (empty, meta) or whose storage cannot be asked for (a tensor subclass): never the same as another."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if ptr == 0 or t.numel() == 0:
        return None
    return t.device, ptr, t.storage_offset(), t.dtype, tuple(t.shape), t.stride()


class TensorSink:
    """Collects the tensors met while encoding one file's trees, naming each by its path; a tensor
    met again under another path is stored once (the later path becomes an alias)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}  # a later path's name -> the name its tensor is stored under
        self._names: dict[tuple, str] = {}  # storage_key -> stored name

    def add(self, path: tuple, t: torch.Tensor, where: str) -> str:
        if t.dtype not in DTYPE_TO_ST:
            raise TypeError(f"{where}{_path_str(path)}: tensors of dtype {t.dtype} cannot be saved "
                            f"(safetensors holds {sorted(str(d) for d in DTYPE_TO_ST)})")
        if t.layout != torch.strided:
            raise TypeError(f"{where}{_path_str(path)}: only dense (strided) tensors can be saved, "
                            f"got layout {t.layout}")
        if t.dim() > MAX_DIMS:
            raise TypeError(f"{where}{_path_str(path)}: tensors of more than {MAX_DIMS} dimensions cannot be saved")
        base = ".".join(str(k) for k in path) or "_"
        key = storage_key(t)
        stored = self._names.get(key) if key is not None else None
        if stored is not None:
            self.aliases.setdefault(base, stored)
            return stored
        name, n = base, 1
        while name in self.tensors:
            name, n = f"{base}#{n}", n + 1
        self.tensors[name] = t
        if key is not None:
            self._names[key] = name
        return name


def encode_tree(value: Any, sink: TensorSink, where: str, path: tuple = ()) -> Any:
    """A JSON-able copy of ``value``; tensors go to ``sink``. ``where`` names the entry in errors."""
    if len(path) > MAX_DEPTH:
        raise ValueError(f"{where}: the value is nested more than {MAX_DEPTH} containers deep")
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        if value.dtype.kind not in _NP_KINDS:
            raise TypeError(f"{where}{_path_str(path)}: numpy scalars of dtype {value.dtype} cannot be saved")
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
        name = str(value).removeprefix("torch.")
        if name not in DTYPES:
            raise TypeError(f"{where}{_path_str(path)}: the dtype {value} cannot be saved")
        return {"$dtype": name}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"{where}{_path_str(path)}: cannot save a value of type {type(value).__qualname__}; "
                    "checkpoints hold tensors, numpy arrays, None, bool, int, float, str, bytes, "
                    "torch.dtype/device and lists, tuples, dicts of these (nothing is pickled)")


def _device_available(d: torch.device) -> bool:
    if d.type == "cpu":
        return True
    if d.type == "cuda":
        return torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count()
    if d.type in _ACCELERATORS:
        mod = getattr(torch, d.type, None)
        return bool(mod is not None and getattr(mod, "is_available", lambda: False)())
    return False  # meta, lazy, ...: no place for the bytes


def decode_tree(node: Any, tensors: dict[str, torch.Tensor], live: Any = None, where: str = "", *,
                place: bool = True) -> Any:
    """The value ``encode_tree`` encoded; CheckpointError (naming ``where``) for any node it would not
    have written. With ``place``, tensors go to the device of the tensor at the same place in
    ``live`` (the object's current state), else to the device they were saved from when it exists
    here, else stay on the CPU; without it they stay as read (a dry run that checks the tree)."""
    return _Decoder(tensors, where, place).node(node, live, 0)


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor], where: str, place: bool) -> None:
        self.tensors, self.where, self.place = tensors, where, place
        self.placed: dict[tuple, torch.Tensor] = {}  # (name, device) -> the tensor moved there: ties survive a move

    def fail(self, problem: str) -> NoReturn:
        raise CheckpointError(f"{self.where}: {problem}")

    def node(self, node: Any, live: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            self.fail(f"the tree nests more than {MAX_DEPTH} containers deep")
        if isinstance(node, list):
            return [self.node(v, _child(live, i), depth + 1) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            return node  # a JSON scalar: None, bool, int, float, str
        tag = next((k for k in node if k.startswith("$")), None)
        if tag is None:
            return {k: self.node(v, _child(live, k), depth + 1) for k, v in node.items()}
        extra = _EXTRA_KEYS.get(tag, set())
        if not set(node) - {tag} <= extra or (tag == "$np" and "value" not in node):
            self.fail(f"malformed {tag} node with keys {sorted(node)}")
        arg = node[tag]
        if tag == "$tensor":
            return self.tensor(arg, node.get("device", "cpu"), live)
        if tag == "$ndarray":
            try:
                return self.lookup(arg).numpy()
            except (TypeError, RuntimeError) as e:
                self.fail(f"tensor {arg!r} cannot be a numpy array: {e}")
        if tag == "$tuple":
            return tuple(self.node(v, _child(live, i), depth + 1) for i, v in enumerate(self.items(tag, arg)))
        if tag == "$dict":
            return self.dict(arg, live, depth)
        if tag == "$float":
            if not isinstance(arg, str) or arg not in _FLOATS:
                self.fail(f"$float must be one of {sorted(_FLOATS)}, got {brief(arg)}")
            return _FLOATS[arg]
        if tag == "$np":
            return self.np_scalar(arg, self.node(node["value"], None, depth + 1))
        if tag == "$dtype":
            if not isinstance(arg, str) or arg not in DTYPES:
                self.fail(f"{brief(arg)} is not a dtype a checkpoint holds")
            return DTYPES[arg]
        if tag == "$device":
            return self.device(arg)
        if tag == "$bytes":
            try:
                return base64.b64decode(arg.encode("ascii"), validate=True)
            except (AttributeError, ValueError) as e:  # not a str, not ASCII, not base64
                self.fail(f"$bytes is not base64 text: {e}")
        self.fail(f"unknown tag {brief(tag)} (written by a newer version?)")

    def items(self, tag: str, arg: Any) -> list:
        if not isinstance(arg, list):
            self.fail(f"{tag} needs a list, got {type(arg).__name__}")
        return arg

    def dict(self, arg: Any, live: Any, depth: int) -> dict:
        out = {}
        for pair in self.items("$dict", arg):
            if not isinstance(pair, list) or len(pair) != 2:
                self.fail(f"$dict needs [key, value] pairs, got {brief(pair)}")
            key = self.node(pair[0], None, depth + 1)
            try:
                hash(key)
            except TypeError:
                self.fail(f"$dict key {brief(key)} is not hashable")
            out[key] = self.node(pair[1], _child(live, key), depth + 1)
        return out

    def lookup(self, name: Any) -> torch.Tensor:
        t = self.tensors.get(name) if isinstance(name, str) else None
        if t is None:
            self.fail(f"tensor {brief(name)} is referenced but missing from the checkpoint")
        return t

    def device(self, arg: Any) -> torch.device:
        try:
            if isinstance(arg, str):
                return torch.device(arg)
        except (RuntimeError, ValueError) as e:
            self.fail(f"{brief(arg)} is not a device: {e}")
        self.fail(f"a device must be a string, got {brief(arg)}")

    def tensor(self, name: Any, saved: Any, live: Any) -> torch.Tensor:
        t = self.lookup(name)
        saved_device = self.device(saved)
        if not self.place:
            return t
        if isinstance(live, torch.Tensor):
            device = live.device
        else:
            device = saved_device if _device_available(saved_device) else torch.device("cpu")
        if t.device == device:
            return t
        moved = self.placed.get((name, device))
        if moved is None:
            moved = self.placed[(name, device)] = t.to(device)
        return moved

    def np_scalar(self, arg: Any, value: Any) -> np.generic:
        dtype = None
        if isinstance(arg, str) and _NP_DTYPE.match(arg):  # numpy parses other strings with a Python parser
            try:
                dtype = np.dtype(arg)
            except (TypeError, ValueError):
                pass
        if dtype is None or dtype.kind not in _NP_KINDS:
            self.fail(f"{brief(arg)} is not a numpy scalar type a checkpoint holds")
        if not isinstance(value, (bool, int, float, str, bytes)):
            self.fail(f"a numpy {dtype} scalar cannot hold {brief(value)}")
        try:
            return dtype.type(value)
        except (TypeError, ValueError, OverflowError) as e:
            self.fail(f"a numpy {dtype} scalar cannot hold {brief(value)}: {e}")


def _child(live: Any, key: Any) -> Any:
    try:
        if isinstance(live, dict):
            return live.get(key)
        if isinstance(live, (list, tuple)) and isinstance(key, int) and 0 <= key < len(live):
            return live[key]
    except TypeError:  # an unhashable key
        pass
    return None
