"""trainpatterns: the model-training design patterns for PyTorch, with fused native kernels.

Public API (re-exported here): the fused optimizers (``FusedAdamW``, ``FusedAdam``, ``FusedSGD``,
``FusedAdagrad``) and ``build_info()``. ``torch`` is imported first so the native module shares its
OpenMP runtime.
"""
import torch  # noqa: F401  (loads torch's OpenMP runtime before ours)

from ._kernels import build_info
from .optim import FusedAdagrad, FusedAdam, FusedAdamW, FusedSGD
# distributed (issue 5): synchronous data parallelism
from . import distributed
from .distributed import SyncDataParallel, init_from_env
from .data import PrefetchLoader, device_prefetch
# issue 6: transfer learning, useful overfitting and distillation, the Trainer's callbacks
from . import overfit, transfer
from .callbacks import Callback
from .overfit import distill, distillation_loss, overfit_check
from .transfer import freeze, param_groups, unfreeze
from .train import Trainer

__version__ = "0.1.0"

__all__ = [
    "FusedAdamW",
    "FusedAdam",
    "FusedSGD",
    "FusedAdagrad",
    "build_info",
    "distributed",
    "SyncDataParallel",
    "init_from_env",
    "__version__",
    "PrefetchLoader",
    "device_prefetch",
    # issue 6
    "Trainer",
    "transfer",
    "overfit",
    "Callback",
    "freeze",
    "unfreeze",
    "param_groups",
    "overfit_check",
    "distill",
    "distillation_loss",
]

# checkpoints (issue 4)
from .checkpoint import CheckpointManager, VirtualEpochs  # noqa: E402

__all__ += ["CheckpointManager", "VirtualEpochs"]
