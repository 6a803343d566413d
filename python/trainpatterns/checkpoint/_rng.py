"""Capture and restore every random number generator a training step may draw from.

A resumed run only repeats the uninterrupted one if dropout masks, shuffles and augmentations draw
the same numbers, so a checkpoint holds the state of: Python's ``random``, numpy's global generator,
torch's CPU generator and the generator of every CUDA device. CUDA states are taken only when CUDA
is initialised in this process (otherwise no CUDA generator has been used, and asking would start
CUDA); they are restored lazily by torch, so restoring never forces CUDA to start either. A saved
state is checked (:func:`check_rng`) before anything is restored, on throwaway generators, so a
damaged one is a CheckpointError while the checkpoint is read, not an error half-way through a
restore.
"""
from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

from ._format import CheckpointError, brief

__all__ = ["capture_rng", "check_rng", "restore_rng"]


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


def check_rng(state: Any, where: str) -> None:
    """CheckpointError unless :func:`restore_rng` accepts ``state``: each CPU generator's state is set
    on a new generator of the same kind; CUDA states (whose size only a started CUDA generator
    knows) must be byte tensors."""
    try:
        if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
            raise ValueError(f"expected the states of python, numpy and torch, got {brief(state)}")
        random.Random().setstate(_as_python_state(state["python"]))
        np.random.RandomState().set_state(state["numpy"])
        if not isinstance(state["torch"], torch.Tensor):
            raise TypeError("the torch state is not a tensor")
        torch.Generator().set_state(state["torch"])
        cuda = state.get("cuda")
        if cuda is not None and not (isinstance(cuda, list) and all(
                isinstance(s, torch.Tensor) and s.dtype == torch.uint8 and s.dim() == 1 for s in cuda)):
            raise TypeError("the CUDA states are not a list of byte tensors")
    except (TypeError, ValueError, LookupError, OverflowError, RuntimeError) as e:
        raise CheckpointError(f"{where}: not a valid RNG state ({e})") from e


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
