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
JSON, so ints stay ints, floats round-trip bit for bit (``repr``), key order is kept. Decoding only
ever builds these types: an untrusted checkpoint cannot run code.
"""
from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .safetensors import DTYPE_TO_ST

__all__ = ["TensorSink", "encode_tree", "decode_tree"]


def _path_str(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path)


class TensorSink:
    """Collects the tensors met while encoding one file's trees, naming each by its path."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, path: tuple, t: torch.Tensor, where: str) -> str:
        if t.dtype not in DTYPE_TO_ST:
            raise TypeError(f"{where}{_path_str(path)}: tensors of dtype {t.dtype} cannot be saved "
                            f"(safetensors holds {sorted(str(d) for d in DTYPE_TO_ST)})")
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
