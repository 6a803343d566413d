"""Capture and restore every random number generator a training step may draw from.

A resumed run only repeats the uninterrupted one if dropout masks, shuffles and augmentations draw
the same numbers, so a checkpoint holds the state of: Python's ``random``, numpy's global generator,
torch's CPU generator and the generator of every CUDA device. CUDA states are taken only when CUDA
is initialised in this process (otherwise no CUDA generator has been used, and asking would start
CUDA); they are restored lazily by torch, so restoring never forces CUDA to start either.
"""
from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """The current generator states, as a tree :func:`encode_tree` can save."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the generators to ``state`` (as :func:`capture_rng` returned it, after a round trip)."""
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn(f"the checkpoint holds the RNG states of {len(cuda)} CUDA device(s) but CUDA is not "
                          "available here: they were not restored", RuntimeWarning, stacklevel=3)
            return
        n = torch.cuda.device_count()
        if n != len(cuda):
            warnings.warn(f"the checkpoint holds the RNG states of {len(cuda)} CUDA device(s), this process sees "
                          f"{n}: restoring the first {min(n, len(cuda))}", RuntimeWarning, stacklevel=3)
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(s.cpu(), device=i)


def _as_python_state(s: Any) -> tuple:
    """random.setstate wants (version, tuple of ints, gauss_next), tuples all the way."""
    version, internal, gauss = s
    return (version, tuple(internal), gauss)
