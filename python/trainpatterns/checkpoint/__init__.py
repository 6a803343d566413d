"""Checkpoints: the full training state, saved atomically in the background, restored exactly.

``CheckpointManager`` saves modules, optimizers, LR schedulers, GradScalers, loaders (anything with
``state_dict()``/``load_state_dict()``), plain values and every RNG state; ``VirtualEpochs`` plans
checkpoints by examples instead of passes over the data; ``load_weights`` warm-starts a module.
For tools and scripts (``tools``): ``read_checkpoint`` reads one checkpoint whole, verified, as flat
tensors and metadata; ``export_weights`` writes a module's weights as a plain safetensors file.
The manager (API, retention) delegates to the writer (background saves) and the reader (verified
loads); the format (safetensors + JSON, no pickle) is described in ``_format``. A checkpoint that
is sound but does not fit the model it is loaded into is a ``CheckpointMismatchError`` (``_fit``).
"""
from ._fit import CheckpointMismatchError
from ._format import CheckpointError
from .manager import CheckpointInfo, CheckpointManager
from .reader import load_weights
from .tools import export_weights, read_checkpoint
from .virtual_epochs import VirtualEpoch, VirtualEpochs

__all__ = ["CheckpointManager", "CheckpointInfo", "CheckpointError", "CheckpointMismatchError", "VirtualEpochs",
           "VirtualEpoch", "load_weights", "read_checkpoint", "export_weights"]
