"""Checkpoints: the full training state, saved atomically in the background, restored exactly.

``CheckpointManager`` saves modules, optimizers, LR schedulers, GradScalers, loaders (anything with
``state_dict()``/``load_state_dict()``), plain values and every RNG state; ``VirtualEpochs`` plans
checkpoints by examples instead of passes over the data; ``load_weights`` warm-starts a module.
The format (safetensors + JSON, no pickle) is described in ``_format`` and ``manager``.
"""
from ._format import CheckpointError
from .manager import CheckpointInfo, CheckpointManager, load_weights
from .virtual_epochs import VirtualEpoch, VirtualEpochs

__all__ = ["CheckpointManager", "CheckpointInfo", "CheckpointError", "VirtualEpochs", "VirtualEpoch", "load_weights"]
