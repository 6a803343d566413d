"""Nested batches: map a function over the leaves of dicts, lists, tuples and namedtuples.

Batches and model outputs come as arbitrarily nested containers of tensors; the loader, the Trainer
and the overfit check all need to move or rebuild them leaf by leaf, so one helper does it for all.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch


def map_leaves(item: Any, fn: Callable[[Any], Any], is_leaf: Callable[[Any], bool]) -> Any:
    """Apply ``fn`` to every leaf of a (nested) mapping / list / tuple / namedtuple; other objects
    pass through unchanged. Mappings come back as plain dicts; lists, tuples and namedtuples keep
    their type."""
    if is_leaf(item):
        return fn(item)
    if isinstance(item, Mapping):
        return {k: map_leaves(v, fn, is_leaf) for k, v in item.items()}
    if isinstance(item, tuple) and hasattr(item, "_fields"):  # namedtuple: positional constructor
        return type(item)(*(map_leaves(v, fn, is_leaf) for v in item))
    if isinstance(item, (list, tuple)):
        return type(item)(map_leaves(v, fn, is_leaf) for v in item)
    return item


def is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Every tensor in ``obj`` moved to ``device`` (``Tensor.to``: a no-op for tensors already there)."""
    return map_leaves(obj, lambda t: t.to(device, non_blocking=non_blocking), is_tensor)
