"""Transfer learning: freeze and unfreeze by name pattern, head replacement, frozen BatchNorm,
discriminative learning rates, gradual unfreezing and cached bottleneck features.

Why a package for this: the three pitfalls users hit when fine-tuning in plain PyTorch are silent.
``requires_grad=False`` does not stop BatchNorm from updating its running statistics in train mode;
a zero gradient (instead of None) lets momentum and weight decay move "frozen" weights; and
parameters unfrozen later never train unless they are added to the optimizer. Every function here
keeps those invariants:

* A frozen parameter has ``requires_grad=False`` and ``.grad is None``. Autograd then never creates
  a gradient for it, and torch's optimizers, the fused ones and SyncDataParallel skip parameters
  whose gradient is None, so neither weight decay nor momentum can move it.
* A normalisation layer (anything with running statistics: BatchNorm1d/2d/3d, SyncBatchNorm,
  InstanceNorm with ``track_running_stats``) that is frozen stays in eval behaviour even after
  ``model.train()``: a forward pre-hook sets its ``training`` flag to False before every forward,
  so its running statistics never change. ``unfreeze`` removes the hook.
* ``unfreeze(..., optimizer=opt)`` and :func:`add_param_group` add the parameters the optimizer
  does not hold yet as a new param group (and extend an attached LR scheduler), so they train.

Patterns
--------
A pattern selects parameters by their names in ``model.named_parameters()`` (``"encoder.0.weight"``)
or by the names of modules that contain them (``"encoder"`` selects every parameter under
``encoder``). Each pattern is one of:

* a glob (``fnmatch`` rules, case-sensitive; ``*`` also matches dots): ``"backbone"``,
  ``"backbone.layer[12]*"``, ``"*.bias"``, ``"*bn*"``;
* a regular expression prefixed with ``re:``, matched against the whole name
  (``re.fullmatch``): ``"re:blocks\\.(10|11)\\..*"``;
* an ``nn.Module`` object that is a submodule of the model.

A name is selected when the pattern matches the parameter's name or the name of any module above
it. A pattern that selects nothing is an error (a typo must not silently freeze nothing).

Modules: ``freezing`` (freeze, unfreeze, frozen norms, summary, head replacement), ``groups``
(``add_param_group``, ``param_groups``), ``gradual`` (``GradualUnfreezing``), ``feature_cache``
(``FeatureCache``); ``_patterns`` holds the pattern rules they share.
"""
from __future__ import annotations

from ._patterns import Pattern, Patterns
from .feature_cache import FeatureCache
from .freezing import TrainableSummary, freeze, is_frozen_norm, replace_head, trainable_summary, unfreeze
from .gradual import GradualUnfreezing
from .groups import add_param_group, param_groups

__all__ = [
    "freeze", "unfreeze", "trainable_summary", "TrainableSummary", "replace_head", "add_param_group",
    "param_groups", "GradualUnfreezing", "FeatureCache", "is_frozen_norm",
]
