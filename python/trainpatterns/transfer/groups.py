"""Optimizer parameter groups for transfer learning: adding newly trainable parameters to a live
optimizer (and its LR scheduler) with :func:`add_param_group`, and discriminative learning rates
by pattern with :func:`param_groups`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from ._patterns import Matcher, Pattern, no_match_error


def add_param_group(optimizer: torch.optim.Optimizer, params: Iterable, *, scheduler: Any = None,
                    **options: Any) -> Optional[dict]:
    """Add to ``optimizer`` the parameters it does not hold yet, as one new param group with
    ``options`` (missing options take the optimizer's defaults). ``params`` is an iterable of
    tensors or of ``(name, tensor)`` pairs; names are required when the optimizer's groups carry
    ``param_names``. Returns the new group, or None when every parameter was already there.

    An LR scheduler attached to the optimizer must know the group, or it schedules only the old
    ones: pass it as ``scheduler`` and its ``base_lrs`` (and a ``LambdaLR``/``MultiplicativeLR``'s
    per-group lambdas, by repeating the last one) are extended, and the group's ``initial_lr`` set.
    Schedulers with other per-group lists (OneCycleLR, CyclicLR) must be created after this call.
    """
    pairs = []
    for item in params:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            pairs.append(item)
        elif isinstance(item, torch.Tensor):
            pairs.append((None, item))
        else:
            raise TypeError(f"params must hold tensors or (name, tensor) pairs, got {type(item).__name__}")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    new, seen = [], set()
    for name, p in pairs:
        if id(p) not in held and id(p) not in seen:
            seen.add(id(p))
            new.append((name, p))
    if not new:
        return None
    group = dict(options)
    group["params"] = [p for _, p in new]
    if any("param_names" in g for g in optimizer.param_groups):
        missing = [i for i, (n, _) in enumerate(new) if n is None]
        if missing:
            raise ValueError("this optimizer's param groups carry param_names: pass (name, tensor) pairs "
                             "(e.g. from model.named_parameters())")
        group["param_names"] = [n for n, _ in new]
    optimizer.add_param_group(group)
    added = optimizer.param_groups[-1]
    if scheduler is not None or any("initial_lr" in g for g in optimizer.param_groups[:-1]):
        added.setdefault("initial_lr", added["lr"])
    if scheduler is not None:
        if getattr(scheduler, "optimizer", optimizer) is not optimizer:
            raise ValueError("scheduler is attached to a different optimizer")
        scheduler.base_lrs.append(added["initial_lr"])
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr.append(added["lr"])
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if isinstance(lambdas, list) and lambdas:
            lambdas.append(lambdas[-1])
    return added


def param_groups(model: nn.Module, spec: Mapping[Pattern, Union[float, Mapping[str, Any]]], base_lr: float, *,
                 exclusive: bool = False, include_frozen: bool = False) -> list:
    """Param groups for discriminative learning rates: ``spec`` maps a pattern to a learning-rate
    multiplier, or to a dict of group options where ``"lr_multiplier"`` (default 1) scales
    ``base_lr`` and the other keys (``weight_decay``, ``betas``...) go into the group as they are::

        opt = FusedAdamW(param_groups(model, {"head": 1.0, "backbone.layer4": 0.3, "*": 0.1}, 1e-3))

    The first pattern (in ``spec`` order) that covers a parameter takes it. With
    ``exclusive=True`` a parameter covered by two patterns is an error instead. A trainable
    parameter that no pattern covers is an error naming it (add a catch-all ``"*"`` last), and so is
    a pattern that covers nothing. Frozen parameters are left out unless ``include_frozen`` (useful
    when gradual unfreezing will make them train later: they sit in the optimizer, skipped while
    their gradient is None). Returns a list of dicts ``{"params", "param_names", "lr", ...}`` in
    ``spec`` order, without empty groups.
    """
    if not math.isfinite(base_lr) or base_lr < 0:
        raise ValueError(f"base_lr must be a finite non-negative number, got {base_lr}")
    if not spec:
        raise ValueError("spec is empty: map at least one pattern (e.g. '*') to a multiplier")
    entries = []
    for pattern, value in spec.items():
        if isinstance(value, Mapping):
            options = dict(value)
            mult = options.pop("lr_multiplier", 1.0)
        else:
            options, mult = {}, value
        if not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult < 0:
            raise ValueError(f"lr multiplier of pattern {pattern!r} must be a finite non-negative number, got {mult!r}")
        if "lr" in options:
            raise ValueError(f"pattern {pattern!r}: give 'lr_multiplier', not 'lr' (lr = base_lr * multiplier)")
        entries.append((Matcher(model, pattern), float(mult), options))
    named = [(n, p) for n, p in model.named_parameters() if include_frozen or p.requires_grad]
    buckets: list = [[] for _ in entries]
    touched = [False] * len(entries)
    uncovered = []
    for name, p in named:
        hits = [i for i, (m, _, _) in enumerate(entries) if m.covers(name)]
        for i in hits:
            touched[i] = True
        if not hits:
            uncovered.append(name)
        elif exclusive and len(hits) > 1:
            both = ", ".join(entries[i][0].describe() for i in hits)
            raise ValueError(f"parameter {name!r} is covered by more than one pattern ({both}) and exclusive=True")
        else:
            buckets[hits[0]].append((name, p))
    if uncovered:
        shown = ", ".join(repr(n) for n in uncovered[:5]) + (" ..." if len(uncovered) > 5 else "")
        raise ValueError(f"{len(uncovered)} trainable parameter(s) covered by no pattern: {shown} "
                         f"(add a catch-all '*' last)")
    for (m, _, _), t in zip(entries, touched):
        if not t:
            raise no_match_error(model, m, "trainable parameter" if not include_frozen else "parameter")
    groups = []
    for (m, mult, options), bucket in zip(entries, buckets):
        if bucket:
            groups.append({**options, "params": [p for _, p in bucket], "param_names": [n for n, _ in bucket],
                           "lr": base_lr * mult})
    return groups
