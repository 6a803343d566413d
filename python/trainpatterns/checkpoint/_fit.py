"""Loading a module's saved state, with an error whose first line says why a checkpoint does not fit.

torch's ``load_state_dict`` error spans lines ("Error(s) in loading state_dict for CNN:" and then one
line per problem), and one-line reports (the Trainer's, the command line's) keep only the first,
which names nothing. :func:`load_module` raises :class:`CheckpointMismatchError` instead, whose
first line names the missing and unexpected keys and the mismatched shapes (long lists cut with a
count). The diagnosis runs only once torch has refused the state, so whatever torch accepts (lazy
modules, load hooks that rename or add keys) still loads; torch's own error stays chained.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["CheckpointMismatchError", "load_module", "misfit"]

_MAX_KEYS = 8  # keys named per list before "... and N more"
_MAX_SHAPES = 4
_TORCH_LOAD_ERROR = "Error(s) in loading state_dict"


class CheckpointMismatchError(ValueError, RuntimeError):
    """A sound checkpoint whose state does not fit the live module (other keys or shapes).

    A ValueError, and a RuntimeError like the ``load_state_dict`` error it replaces, so code that
    caught either keeps working. Not a CheckpointError: an older checkpoint of the same run would
    not fit either, so "latest" and "best" do not fall back past it."""


def _listed(items: list, limit: int) -> str:
    more = len(items) - limit
    return ", ".join(items[:limit] + ([f"... and {more} more"] if more > 0 else []))


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _shapes_differ(saved: Any, live: Any) -> bool:
    """As ``load_state_dict`` decides: a lazy parameter takes any shape, a 0-d one a value of shape (1,)."""
    if not isinstance(saved, torch.Tensor) or not isinstance(live, torch.Tensor):
        return False
    if torch.nn.parameter.is_lazy(live) or (live.dim() == 0 and tuple(saved.shape) == (1,)):
        return False
    return saved.shape != live.shape


def misfit(module: torch.nn.Module, saved: Mapping[str, Any], strict: bool) -> str:
    """What keeps ``saved`` from loading into ``module``, in one line ("" if nothing the keys and
    shapes show): missing and unexpected keys (with ``strict``), then shape mismatches."""
    live = module.state_dict()
    parts = []
    if strict:
        missing = [repr(k) for k in live if k not in saved]
        unexpected = [repr(k) for k in saved if k not in live]
        if missing:
            parts.append(f"missing keys [{_listed(missing, _MAX_KEYS)}]")
        if unexpected:
            parts.append(f"unexpected keys [{_listed(unexpected, _MAX_KEYS)}]")
    shapes = [f"{k}: checkpoint {_shape(v)} vs model {_shape(live[k])}"
              for k, v in saved.items() if k in live and _shapes_differ(v, live[k])]
    if shapes:
        parts.append(f"shape mismatch {_listed(shapes, _MAX_SHAPES)}")
    return "; ".join(parts)


def load_module(module: torch.nn.Module, saved: Mapping[str, Any], strict: bool, source: str):
    """``module.load_state_dict(saved, strict=strict)``; its refusal becomes a CheckpointMismatchError
    "<source> does not fit <Class>: <what differs>", one line. Returns what ``load_state_dict`` returns."""
    try:
        return module.load_state_dict(saved, strict=strict)
    except RuntimeError as e:
        if not str(e).startswith(_TORCH_LOAD_ERROR):
            raise
        detail = misfit(module, saved, strict) or " ".join(str(e).split())
        raise CheckpointMismatchError(f"{source} does not fit {type(module).__name__}: {detail}") from e
