"""Freeze and unfreeze by pattern, frozen normalisation layers, the trainable summary and head
replacement: the part of transfer learning that decides what trains.

A frozen parameter has ``requires_grad=False`` and ``.grad is None``; a frozen normalisation layer
with running statistics carries a forward pre-hook that keeps it in eval behaviour whatever
``model.train()`` sets (see the package docstring, :mod:`trainpatterns.transfer`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ._patterns import Patterns, select
from .groups import add_param_group


# ----- frozen normalisation layers -----------------------------------------------------------------

def _frozen_norm_pre_hook(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a frozen norm layer: eval behaviour whatever ``model.train()`` set, so
    the batch is normalised with the running statistics and they are not updated."""
    module.training = False


def _is_stat_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats


def is_frozen_norm(module: nn.Module) -> bool:
    """True if ``module`` is a normalisation layer held in eval behaviour by :func:`freeze`."""
    return any(h is _frozen_norm_pre_hook for h in module._forward_pre_hooks.values())


def _lock_norm(module: nn.Module) -> None:
    if not is_frozen_norm(module):
        module.register_forward_pre_hook(_frozen_norm_pre_hook)
    module.training = False


def _unlock_norm(module: nn.Module, training: bool) -> None:
    for key in [k for k, h in module._forward_pre_hooks.items() if h is _frozen_norm_pre_hook]:
        del module._forward_pre_hooks[key]
    module.training = training


# ----- freeze / unfreeze ---------------------------------------------------------------------------

def freeze(model: nn.Module, patterns: Patterns = None, *, bn_eval: bool = True) -> list:
    """Freeze the parameters ``patterns`` select (all of them when ``patterns`` is None).

    Each selected parameter gets ``requires_grad=False`` and ``.grad = None`` (a zero gradient
    would let momentum and weight decay move it). With ``bn_eval`` (the default, as in Keras),
    normalisation layers with running statistics that are selected as modules, or whose
    parameters are now all frozen, stay in eval behaviour after ``model.train()``.

    Returns the names of the selected parameters.
    """
    params, modules = select(model, patterns)
    for _, p in params:
        p.requires_grad_(False)
        p.grad = None
    if bn_eval:
        selected = {id(m) for _, m in modules}
        for _, mod in model.named_modules():
            if not _is_stat_norm(mod):
                continue
            own = list(mod.parameters(recurse=False))
            if id(mod) in selected or (own and not any(p.requires_grad for p in own)):
                _lock_norm(mod)
    return [n for n, _ in params]


def unfreeze(model: nn.Module, patterns: Patterns = None, *, optimizer: Optional[torch.optim.Optimizer] = None,
             scheduler: Any = None, **group_options: Any) -> list:
    """Make the parameters ``patterns`` select trainable again (all when None) and release the
    selected normalisation layers (and those whose parameters become trainable) from eval mode:
    they follow ``model.training`` again.

    With ``optimizer``, the selected parameters it does not hold yet are added as one new param
    group with ``group_options`` (``lr=...``, ``weight_decay=...``; the optimizer's defaults
    otherwise), through :func:`add_param_group` (``scheduler`` is extended too). Parameters it
    already holds keep their group. Returns the names of the selected parameters.
    """
    params, modules = select(model, patterns)
    for _, p in params:
        p.requires_grad_(True)
    selected = {id(m) for _, m in modules}
    unfrozen = {id(p) for _, p in params}
    for _, mod in model.named_modules():
        if is_frozen_norm(mod) and (id(mod) in selected or any(id(p) in unfrozen for p in mod.parameters(recurse=False))):
            _unlock_norm(mod, model.training)
    if optimizer is not None:
        add_param_group(optimizer, params, scheduler=scheduler, **group_options)
    elif scheduler is not None or group_options:
        raise ValueError("scheduler= and param-group options need optimizer= as well")
    return [n for n, _ in params]


# ----- summary and head replacement ---------------------------------------------------------------

@dataclass
class TrainableSummary:
    """What trains in a model. ``rows``: (name, shape or "", numel, trainable numel); ``str()``
    gives the table. ``frozen_norms``: names of norm layers held in eval behaviour."""

    rows: list
    total: int
    trainable: int
    frozen_norms: list

    def __str__(self) -> str:
        head = ("name", "shape", "params", "trainable")
        body = []
        for name, shape, numel, tr in self.rows:
            status = "yes" if tr == numel else ("no" if tr == 0 else f"{tr:,}/{numel:,}")
            body.append((name, shape, f"{numel:,}", status))
        widths = [max([len(head[i])] + [len(r[i]) for r in body]) for i in range(4)]
        fmt = lambda r: f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:<{widths[3]}}"
        lines = [fmt(head), "-" * (sum(widths) + 6)] + [fmt(r) for r in body]
        frac = self.trainable / self.total if self.total else 0.0
        lines.append(f"trainable {self.trainable:,} of {self.total:,} parameters ({100 * frac:.1f}%)")
        if self.frozen_norms:
            lines.append("norm layers held in eval mode: " + ", ".join(self.frozen_norms))
        return "\n".join(lines)


def trainable_summary(model: nn.Module, depth: Optional[int] = None) -> TrainableSummary:
    """A table of what trains: one row per parameter, or with ``depth=k`` one row per module path
    cut to its first ``k`` components (``depth=1``: top-level children), in model order."""
    if depth is not None and depth < 1:
        raise ValueError(f"depth must be >= 1 or None, got {depth}")
    rows: dict = {}
    for name, p in model.named_parameters():
        key = name if depth is None else ".".join(name.split(".")[:depth])
        shape = "x".join(map(str, p.shape)) if depth is None or key == name else ""
        _, _, numel, tr = rows.get(key, (key, shape, 0, 0))
        rows[key] = (key, shape, numel + p.numel(), tr + (p.numel() if p.requires_grad else 0))
    total = sum(r[2] for r in rows.values())
    trainable = sum(r[3] for r in rows.values())
    norms = [n or "(root)" for n, m in model.named_modules() if is_frozen_norm(m)]
    return TrainableSummary(list(rows.values()), total, trainable, norms)


def replace_head(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Replace the submodule at dotted path ``name`` (``"fc"``, ``"classifier.6"``) by
    ``new_module`` and return the old one. The new module is moved to the device and floating
    dtype of the old module's parameters (when it had any), so it can run at once."""
    if not isinstance(new_module, nn.Module):
        raise TypeError(f"new_module must be an nn.Module, got {type(new_module).__name__}")
    if not name:
        raise ValueError("name must be the dotted path of a submodule, e.g. 'fc'")
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        raise ValueError(f"model has no submodule {parent_name!r} (in head path {name!r})") from None
    old = parent._modules.get(leaf)
    if old is None:
        children = list(parent._modules)
        raise ValueError(f"{parent_name or type(model).__name__} has no child module {leaf!r} "
                         f"(children: {children})")
    ref = next(old.parameters(), None)
    if ref is not None:
        new_module = new_module.to(device=ref.device)
        if ref.is_floating_point():
            new_module = new_module.to(dtype=ref.dtype)
    setattr(parent, leaf, new_module)
    return old
