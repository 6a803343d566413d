"""trainpatterns: the model-training design patterns for PyTorch, with fused native kernels.

Public API (re-exported here): the fused optimizers (``FusedAdamW``, ``FusedAdam``, ``FusedSGD``,
``FusedAdagrad``) and ``build_info()``. ``torch`` is imported first so the native module shares its
OpenMP runtime.
"""
import torch  # noqa: F401  (loads torch's OpenMP runtime before ours)

from ._kernels import build_info
from .optim import FusedAdagrad, FusedAdam, FusedAdamW, FusedSGD
from .tuning import Study, Trial, create_study, load_study  # issue 7: hyperparameter tuning

__version__ = "0.1.0"

__all__ = [
    "FusedAdamW",
    "FusedAdam",
    "FusedSGD",
    "FusedAdagrad",
    "build_info",
    "__version__",
    # issue 7: hyperparameter tuning (the samplers and pruners live in trainpatterns.tuning)
    "create_study",
    "load_study",
    "Study",
    "Trial",
]
