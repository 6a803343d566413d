"""trainpatterns: the model-training design patterns for PyTorch, with fused native kernels.

Public API, re-exported here (each module documents its part):

* ``trainpatterns.optim``: fused optimizers ``FusedAdamW``, ``FusedAdam``, ``FusedSGD``, ``FusedAdagrad``.
* ``trainpatterns.data``: ``PrefetchLoader`` (native gather threads) and ``device_prefetch``.
* ``trainpatterns.checkpoint``: ``CheckpointManager`` and ``VirtualEpochs``.
* ``trainpatterns.distributed``: ``init_from_env`` and ``SyncDataParallel``.
* ``trainpatterns.train``: the ``Trainer``, its ``Callback`` interface and ``EarlyStopping``.
* ``trainpatterns.transfer``: ``freeze``, ``unfreeze``, ``param_groups`` and more.
* ``trainpatterns.overfit``: ``overfit_check``, ``interpolate``, ``lbfgs_finish``, ``distill``, ``distillation_loss``.
* ``trainpatterns.tuning``: ``create_study``, ``load_study``, ``Study``, ``Trial``, samplers, pruners.

``torch`` is imported first so that the native module shares its OpenMP runtime. The tuning package
is imported on first use of ``trainpatterns.tuning`` or one of its names here (it needs scipy, which
a training run never uses), so ``import trainpatterns`` stays cheap.
"""
import importlib
from typing import Any

import torch  # noqa: F401  (loads torch's OpenMP runtime before ours)

from . import distributed, overfit, transfer
from ._kernels import build_info
from .callbacks import Callback, EarlyStopping
from .checkpoint import CheckpointManager, VirtualEpochs
from .data import PrefetchLoader, device_prefetch
from .loggers import CSVLogger, TensorBoardLogger
from .distributed import SyncDataParallel, init_from_env
from .optim import FusedAdagrad, FusedAdam, FusedAdamW, FusedSGD
from .overfit import distill, distillation_loss, interpolate, lbfgs_finish, overfit_check
from .train import Trainer
from .transfer import freeze, param_groups, unfreeze

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
    "EarlyStopping",
    "CSVLogger",
    "TensorBoardLogger",
    # transfer learning
    "transfer",
    "freeze",
    "unfreeze",
    "param_groups",
    # useful overfitting and distillation
    "overfit",
    "overfit_check",
    "interpolate",
    "lbfgs_finish",
    "distill",
    "distillation_loss",
    # hyperparameter tuning (samplers and pruners live in trainpatterns.tuning)
    "create_study",
    "load_study",
    "Study",
    "Trial",
]

# Names served by __getattr__ below: the tuning package, and what it re-exports here.
_LAZY_TUNING = ("tuning", "Study", "Trial", "create_study", "load_study")


def __getattr__(name: str) -> Any:
    """Import ``trainpatterns.tuning`` on first access of one of its names (PEP 562)."""
    if name in _LAZY_TUNING:
        tuning = importlib.import_module(".tuning", __name__)
        value = tuning if name == "tuning" else getattr(tuning, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY_TUNING))
