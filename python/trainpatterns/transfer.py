"""Transfer learning: freeze and unfreeze by name pattern, head replacement, frozen BatchNorm,
discriminative learning rates, gradual unfreezing and cached bottleneck features.

Why a module for this: the three pitfalls users hit when fine-tuning in plain PyTorch are silent.
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
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .callbacks import Callback

__all__ = [
    "freeze", "unfreeze", "trainable_summary", "TrainableSummary", "replace_head", "add_param_group",
    "param_groups", "GradualUnfreezing", "FeatureCache", "is_frozen_norm",
]

Pattern = Union[str, nn.Module]
Patterns = Union[Pattern, Iterable[Pattern], None]


# ----- pattern matching ----------------------------------------------------------------------------

def _as_pattern_list(patterns: Patterns) -> Optional[list]:
    if patterns is None:
        return None
    if isinstance(patterns, (str, nn.Module)):
        return [patterns]
    out = list(patterns)
    for p in out:
        if not isinstance(p, (str, nn.Module)):
            raise TypeError(f"a pattern must be a string or an nn.Module, got {type(p).__name__}: {p!r}")
    return out


def _compile(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
        return lambda name: rx.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _prefixes(name: str) -> list:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``: the module path down to the name itself."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


class _Matcher:
    """One compiled pattern; ``covers(name)`` is True when the name or a module above it matches."""

    def __init__(self, model: nn.Module, pattern: Pattern) -> None:
        self.pattern = pattern
        if isinstance(pattern, nn.Module):
            names = [n for n, m in model.named_modules() if m is pattern]
            if not names:
                raise ValueError(f"module {type(pattern).__name__} passed as a pattern is not a submodule of "
                                 f"the model")
            self._module_names = set(names)
            self._fn = None
        else:
            if not pattern:
                raise ValueError("an empty string is not a pattern (use None to select the whole model)")
            self._fn = _compile(pattern)

    def covers(self, name: str) -> bool:
        if name == "":
            return self._fn is None and "" in self._module_names
        if self._fn is None:
            return "" in self._module_names or any(p in self._module_names for p in _prefixes(name))
        return any(self._fn(p) for p in _prefixes(name))

    def describe(self) -> str:
        return repr(self.pattern) if isinstance(self.pattern, str) else f"module {type(self.pattern).__name__}"


def _matchers(model: nn.Module, patterns: Patterns) -> Optional[list]:
    plist = _as_pattern_list(patterns)
    return None if plist is None else [_Matcher(model, p) for p in plist]


def _no_match_error(model: nn.Module, matcher: _Matcher, what: str = "parameter or module") -> ValueError:
    examples = [n for n, _ in model.named_parameters()][:4]
    return ValueError(f"pattern {matcher.describe()} matches no {what} of {type(model).__name__} "
                      f"(parameter names look like {examples}; globs use fnmatch rules, regexes need 're:')")


def _select(model: nn.Module, patterns: Patterns) -> tuple[list, list]:
    """(selected (name, param) pairs, selected (name, module) pairs) for ``patterns``; every
    pattern must select at least one parameter or module."""
    matchers = _matchers(model, patterns)
    named_params = list(model.named_parameters())
    named_modules = list(model.named_modules())
    if matchers is None:
        return named_params, named_modules
    params = [(n, p) for n, p in named_params if any(m.covers(n) for m in matchers)]
    modules = [(n, mod) for n, mod in named_modules if any(m.covers(n) for m in matchers)]
    for m in matchers:
        if not any(m.covers(n) for n, _ in named_params) and not any(m.covers(n) for n, _ in named_modules):
            raise _no_match_error(model, m)
    return params, modules


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
    params, modules = _select(model, patterns)
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
    params, modules = _select(model, patterns)
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


# ----- optimizer helpers ---------------------------------------------------------------------------

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
        entries.append((_Matcher(model, pattern), float(mult), options))
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
            raise _no_match_error(model, m, "trainable parameter" if not include_frozen else "parameter")
    groups = []
    for (m, mult, options), bucket in zip(entries, buckets):
        if bucket:
            groups.append({**options, "params": [p for _, p in bucket], "param_names": [n for n, _ in bucket],
                           "lr": base_lr * mult})
    return groups


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


# ----- gradual unfreezing --------------------------------------------------------------------------

class GradualUnfreezing(Callback):
    """Trainer callback: train the head alone first, then unfreeze one more block every ``every``
    virtual epochs (ULMFiT's gradual unfreezing; the new head's random gradients would otherwise
    damage the pretrained features).

    ``blocks`` lists patterns in unfreezing order, nearest the head first (e.g. ``["layer4",
    "layer3", "layer2"]``). At virtual epoch ``e`` the first ``min(len(blocks), e // every)`` blocks
    are trainable and the rest frozen, a function of ``e`` only, so a resumed run is in the same
    state. At fit start every block's parameters the optimizer lacks are added to it, one group per
    block, with ``lr`` (a float or one per block; default the optimizer's default lr) times
    ``lr_decay ** (k + 1)`` for block k: frozen members of the optimizer are skipped while their
    gradient is None, and the optimizer's structure stays fixed, so checkpoints restore into it.
    """

    def __init__(self, blocks: Sequence[Patterns], every: int = 1, *, lr: Union[float, Sequence[float], None] = None,
                 lr_decay: float = 1.0, bn_eval: bool = True) -> None:
        if not blocks:
            raise ValueError("blocks is empty: list the patterns to unfreeze, nearest the head first")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (virtual epochs), got {every!r}")
        if not (lr_decay > 0 and math.isfinite(lr_decay)):
            raise ValueError(f"lr_decay must be a positive finite number, got {lr_decay}")
        if isinstance(lr, Sequence) and len(lr) != len(blocks):
            raise ValueError(f"lr has {len(lr)} values for {len(blocks)} blocks")
        self.blocks = list(blocks)
        self.every = every
        self.lr = lr
        self.lr_decay = lr_decay
        self.bn_eval = bn_eval

    def unfrozen_blocks(self, epoch: int) -> int:
        """How many blocks train during virtual epoch ``epoch``."""
        return min(len(self.blocks), max(0, epoch) // self.every)

    def on_fit_start(self, trainer: Any) -> None:
        model, opt = trainer.model, trainer.optimizer
        for k, block in enumerate(self.blocks):
            params, _ = _select(model, block)
            if isinstance(self.lr, Sequence):
                lr = self.lr[k]
            else:
                lr = opt.defaults["lr"] if self.lr is None else self.lr
            add_param_group(opt, params, scheduler=getattr(trainer, "scheduler", None),
                            lr=lr * self.lr_decay ** (k + 1))
        self.apply(model, getattr(trainer, "epoch", 0))

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.apply(trainer.model, epoch)

    def apply(self, model: nn.Module, epoch: int) -> None:
        """Set the model's frozen/trainable state for virtual epoch ``epoch``."""
        n = self.unfrozen_blocks(epoch)
        for block in self.blocks[n:]:
            freeze(model, block, bn_eval=self.bn_eval)
        for block in self.blocks[:n]:
            unfreeze(model, block)


# ----- cached bottleneck features ------------------------------------------------------------------

_META = "meta.json"


class FeatureCache:
    """Run a frozen ``backbone`` once over ``inputs`` and keep the outputs (the bottleneck
    features), so a head trains on them without a backbone forward per epoch.

    ``inputs``: a tensor or numpy array (``np.memmap`` included) with one example per row; it is
    fed to the backbone ``batch_size`` rows at a time, on ``device`` (default: the backbone's).
    ``targets`` (optional, same first dimension) is kept beside the features. Features are stored
    with ``dtype`` (default: the backbone's output dtype) in memory, or, with ``directory``, in
    ``directory/features.npy`` as an ``np.memmap`` (for data larger than memory; reopen with
    :meth:`load`). ``meta.json`` is written last, so a cache interrupted while being built is never
    loaded.

    The backbone runs in eval mode under ``torch.no_grad()`` and must be frozen (no parameter with
    ``requires_grad``): features of a training backbone would go stale. Random data augmentation
    cannot be cached: cache the un-augmented inputs, or augment in feature space.
    """

    def __init__(self, backbone: nn.Module, inputs: Any, targets: Any = None, *, batch_size: int = 256,
                 directory: Optional[Union[str, os.PathLike]] = None, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> None:
        trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the backbone has {len(trainable)} trainable parameter(s) (e.g. {trainable[0]!r}): "
                             f"freeze it first (trainpatterns.transfer.freeze(backbone)), cached features "
                             f"would go stale")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        x = _as_rows(inputs, "inputs")
        n = x.shape[0]
        if targets is not None:
            targets = _as_rows(targets, "targets")
            if targets.shape[0] != n:
                raise ValueError(f"targets has {targets.shape[0]} rows but inputs has {n}")
        if n == 0:
            raise ValueError("inputs is empty: nothing to cache")
        self.directory = None if directory is None else os.fspath(directory)
        if self.directory is not None:
            if os.path.exists(os.path.join(self.directory, _META)) and not overwrite:
                raise FileExistsError(f"{self.directory} already holds a feature cache: FeatureCache.load() it, "
                                      f"or pass overwrite=True")
            os.makedirs(self.directory, exist_ok=True)
            meta = os.path.join(self.directory, _META)
            if os.path.exists(meta):
                os.remove(meta)  # invalidate the old cache before overwriting its arrays
        if device is None:
            ref = next(backbone.parameters(), None)
            device = ref.device if ref is not None else torch.device("cpu")
        was_training = backbone.training
        backbone.eval()
        store = None
        try:
            with torch.no_grad():
                for start in range(0, n, batch_size):
                    rows = x[start:start + batch_size]
                    xb = (torch.from_numpy(np.array(rows)) if isinstance(rows, np.ndarray) else rows).to(device)
                    out = backbone(xb)
                    if not isinstance(out, torch.Tensor):
                        raise TypeError(f"the backbone must return one tensor, got {type(out).__name__}")
                    if out.shape[0] != xb.shape[0]:
                        raise ValueError(f"the backbone returned {out.shape[0]} rows for a batch of {xb.shape[0]}")
                    if store is None:
                        store = self._allocate(n, tuple(out.shape[1:]), dtype or out.dtype)
                    store[start:start + out.shape[0]] = _to_store(out.detach().cpu().to(dtype or out.dtype), store)
        finally:
            backbone.train(was_training)
        if self.directory is not None:
            store.flush()
            if targets is not None:
                np.save(os.path.join(self.directory, "targets.npy"), _to_numpy(targets))
            self._write_meta(n, store, targets is not None)
            self._features = torch.from_numpy(store)
            self._targets = None if targets is None else _readonly_tensor(
                np.load(os.path.join(self.directory, "targets.npy"), mmap_mode="r"))
        else:
            self._features = store
            self._targets = None if targets is None else torch.as_tensor(targets)

    def _allocate(self, n: int, shape: tuple, dtype: torch.dtype):
        if self.directory is None:
            return torch.empty((n, *shape), dtype=dtype)
        if dtype == torch.bfloat16:
            raise ValueError("bfloat16 features cannot be stored in an np.memmap: use float16 or float32")
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        return np.lib.format.open_memmap(os.path.join(self.directory, "features.npy"), mode="w+",
                                         dtype=np_dtype, shape=(n, *shape))

    def _write_meta(self, n: int, store: np.ndarray, has_targets: bool) -> None:
        meta = dict(num_examples=n, feature_shape=list(store.shape[1:]), dtype=str(store.dtype),
                    targets=has_targets)
        tmp = os.path.join(self.directory, _META + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.directory, _META))

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> "FeatureCache":
        """Reopen a cache built with ``directory=`` (features memory-mapped, read-only)."""
        directory = os.fspath(directory)
        meta_path = os.path.join(directory, _META)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{directory} holds no complete feature cache (no {_META})")
        with open(meta_path) as f:
            meta = json.load(f)
        feats = np.load(os.path.join(directory, "features.npy"), mmap_mode="r")
        if feats.shape[0] != meta["num_examples"] or list(feats.shape[1:]) != meta["feature_shape"]:
            raise ValueError(f"{directory}/features.npy has shape {feats.shape}, meta.json says "
                             f"{meta['num_examples']} x {meta['feature_shape']}: the cache is damaged")
        self = cls.__new__(cls)
        self.directory = directory
        self._features = _readonly_tensor(feats)
        self._targets = (_readonly_tensor(np.load(os.path.join(directory, "targets.npy"), mmap_mode="r"))
                         if meta["targets"] else None)
        return self

    @property
    def features(self) -> torch.Tensor:
        """All cached features, ``(num_examples, *feature_shape)`` on the CPU (memory-mapped when
        the cache is on disk)."""
        return self._features

    @property
    def targets(self) -> Optional[torch.Tensor]:
        return self._targets

    def __len__(self) -> int:
        return self._features.shape[0]

    def arrays(self) -> tuple:
        """``(features,)`` or ``(features, targets)``: array data for a loader or the Trainer."""
        return (self._features,) if self._targets is None else (self._features, self._targets)

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                drop_last: bool = False) -> Iterator[tuple]:
        """One epoch of ``(features, targets)`` batches (``(features,)`` without targets), in an
        order that depends on ``(seed, epoch)`` only."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        else:
            order = torch.arange(n)
        end = n - n % batch_size if drop_last else n
        arrays = self.arrays()
        for start in range(0, end, batch_size):
            idx = order[start:start + batch_size]
            yield tuple(a.index_select(0, idx) for a in arrays)


def _as_rows(a: Any, what: str):
    if isinstance(a, torch.Tensor):
        if a.dim() == 0:
            raise ValueError(f"{what} must have one example per row, got a 0-d tensor")
        return a
    if isinstance(a, np.ndarray):
        if a.ndim == 0:
            raise ValueError(f"{what} must have one example per row, got a 0-d array")
        return a
    raise TypeError(f"{what} must be a torch tensor or a numpy array, got {type(a).__name__}")


def _to_numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _to_store(t: torch.Tensor, store: Any):
    return t.numpy() if isinstance(store, np.ndarray) else t


def _readonly_tensor(a: np.ndarray) -> torch.Tensor:
    # torch.from_numpy warns on read-only arrays; the tensor is only ever read (index_select copies).
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)
