"""trainpatterns.tuning: hyperparameter search around a training loop.

Define-by-run objectives (``trial.suggest_float / suggest_int / suggest_categorical``, as in
Optuna), grid / random (Sobol) / Gaussian-process samplers, ASHA early stopping with per-trial
checkpoint directories, and SQLite studies that several processes share and that resume after a
kill. Plots (optional matplotlib) in ``trainpatterns.tuning.plots``.

    study = create_study(direction="minimize", sampler=GPSampler(seed=0), pruner=ASHAPruner(),
                         storage="tune.db", study_name="mlp", load_if_exists=True)
    study.optimize(objective, n_trials=50)
    print(study.best_trial.params)
"""
from .asha import ASHAPruner
from .base import Sampler
from .gp import GPSampler
from .grid import GridSampler
from .importance import param_importances
from .random import RandomSampler
from .space import CategoricalDistribution, FloatDistribution, IntDistribution
from .sqlite import SQLiteStorage
from .study import Study, create_study, load_study
from .trial import FrozenTrial, Trial, TrialPruned, TrialState

__all__ = [
    "create_study", "load_study", "Study", "Trial", "FrozenTrial", "TrialState", "TrialPruned",
    "Sampler", "GridSampler", "RandomSampler", "GPSampler", "ASHAPruner", "SQLiteStorage",
    "FloatDistribution", "IntDistribution", "CategoricalDistribution", "param_importances",
]
