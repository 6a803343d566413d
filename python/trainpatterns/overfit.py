"""Useful overfitting: the one-batch overfit check, interpolation mode for noise-free complete data
with its L-BFGS finish, and knowledge distillation.

Overfitting is the goal, not the failure, in three situations this module serves:

* Debugging: a model that cannot drive the loss on one batch to near zero has a bug (or is too
  small). :func:`overfit_check` runs that test on a copy and reports; it never touches the caller's
  model or optimizer, and it reports, rather than raises, when the model cannot fit.
* Interpolation: when the data is noise-free and covers the whole input space (a physics
  surrogate, a lookup table), the best model fits every point; regularisation and early stopping
  only hurt. :func:`interpolate` trains that way, finishes with full-batch L-BFGS in float64
  (:func:`lbfgs_finish`, also usable after any training loop) and measures the worst-case error
  over the whole dataset (:func:`max_error`).
* Distillation: a small student learns the teacher's full output distribution (softened by a
  temperature), which carries more information per example than the hard label
  (:func:`distillation_loss`, :func:`distill`).

The code lives in one private module per job (``_overfit_check``, ``_interpolation``, ``_lbfgs``,
``_distill``, and ``_overfit_base`` for what they share); this module is their public face.
"""
from ._distill import DistillationLoss, distill, distillation_loss
from ._interpolation import InterpolationReport, interpolate
from ._lbfgs import LBFGSReport, lbfgs_finish
from ._overfit_base import disable_regularization, max_error
from ._overfit_check import OverfitReport, overfit_check

__all__ = [
    "overfit_check", "OverfitReport", "disable_regularization", "max_error", "interpolate",
    "InterpolationReport", "lbfgs_finish", "LBFGSReport", "distillation_loss", "DistillationLoss", "distill",
]
