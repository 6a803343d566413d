"""trainpatterns: the model-training design patterns for PyTorch, with fused native kernels.

Public API, re-exported here (each module documents its part):

* ``trainpatterns.optim``: fused optimizers ``FusedAdamW``, ``FusedAdam``, ``FusedSGD``, ``FusedAdagrad``.
* ``trainpatterns.data``: ``PrefetchLoader`` (native gather threads) and ``device_prefetch``.
* ``trainpatterns.checkpoint``: ``CheckpointManager`` and ``VirtualEpochs``.
* ``trainpatterns.distributed``: ``init_from_env`` and ``SyncDataParallel``.
* ``trainpatterns.train``: the ``Trainer`` and its ``Callback`` interface.
* ``trainpatterns.transfer``: ``freeze``, ``unfreeze``, ``param_groups`` and more.
* ``trainpatterns.overfit``: ``overfit_check``, ``distill``, ``distillation_loss``.
* ``trainpatterns.tuning``: ``create_study``, ``load_study``, ``Study``, ``Trial``, samplers, pruners.

``torch`` is imported first so that the native module shares its OpenMP runtime.
"""
import torch  # noqa: F401  (loads torch's OpenMP runtime before ours)

from . import distributed, overfit, transfer
from ._kernels import build_info
from .callbacks import Callback
from .checkpoint import CheckpointManager, VirtualEpochs
from .data import PrefetchLoader, device_prefetch
from .distributed import SyncDataParallel, init_from_env
from .optim import FusedAdagrad, FusedAdam, FusedAdamW, FusedSGD
from .overfit import distill, distillation_loss, overfit_check
from .train import Trainer
from .transfer import freeze, param_groups, unfreeze
from .tuning import Study, Trial, create_study, load_study

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_info",
    # fused optimizers
    "FusedAdamW",
    "FusedAdam",
    "FusedSGD",
    "FusedAdagrad",
    # data loading
    "PrefetchLoader",
    "device_prefetch",
    # checkpoints
    "CheckpointManager",
    "VirtualEpochs",
    # distribution
    "distributed",
    "SyncDataParallel",
    "init_from_env",
    # the training loop
    "Trainer",
    "Callback",
    # transfer learning
    "transfer",
    "freeze",
    "unfreeze",
    "param_groups",
    # useful overfitting and distillation
    "overfit",
    "overfit_check",
    "distill",
    "distillation_loss",
    # hyperparameter tuning (samplers and pruners live in trainpatterns.tuning)
    "create_study",
    "load_study",
    "Study",
    "Trial",
]
