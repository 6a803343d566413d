"""Argument checks shared by ``PrefetchLoader`` and ``device_prefetch``: both take integer
settings with a lower bound and a device given as None, ``"cpu"`` or a CUDA device, and reject the
same bad values with the same messages.
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int; TypeError unless it is an int (numpy ints too, bools not),
    ValueError when it is below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """The device batches go to: the CPU for None, a CUDA device with its index filled in (the
    current one when none is given). RuntimeError when CUDA is asked for but unavailable."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {dev} requested but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device must be None, 'cpu' or a CUDA device, got {dev}")
    return dev
