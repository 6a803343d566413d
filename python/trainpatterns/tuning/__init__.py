"""trainpatterns.tuning: hyperparameter search around a training loop.

Define-by-run objectives (``trial.suggest_float / suggest_int / suggest_categorical``,
``trial.report(value, step)``, as in Optuna), grid / random (Sobol) / Gaussian-process samplers,
ASHA early stopping with per-trial checkpoint directories, and SQLite studies that several
processes share and that resume after a kill. Studies move to and from Optuna's storages
(``Study.export_to_optuna``, ``import_from_optuna``); ``study.trials_dataframe()`` gives pandas.
Plots (optional matplotlib) in ``trainpatterns.tuning.plots``.

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
from .study import Study, create_study, import_from_optuna, load_study
from .trial import FrozenTrial, Trial, TrialPruned, TrialState

__all__ = [
    "create_study", "load_study", "import_from_optuna", "Study", "Trial", "FrozenTrial", "TrialState", "TrialPruned",
    "Sampler", "GridSampler", "RandomSampler", "GPSampler", "ASHAPruner", "SQLiteStorage",
    "FloatDistribution", "IntDistribution", "CategoricalDistribution", "param_importances",
]
