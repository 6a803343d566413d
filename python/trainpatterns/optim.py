"""Fused optimizers: FusedAdamW, FusedAdam, FusedSGD and FusedAdagrad.

Drop-in subclasses of ``torch.optim.Optimizer`` with torch's hyperparameters, defaults, param-group
behaviour and ``state_dict`` layout, whose step is one native pass over memory per tensor list
(csrc/optim). What makes them fast beyond the kernel:

* Pointer tables are built once per param group and reused while the gradients are the same
  tensors; new gradient tensors (``zero_grad(set_to_none=True)``) only refresh one row.
* Step counts live in one float tensor per table that the kernel increments; ``state["step"]``
  entries are 0-d views into it, so the state keeps torch's layout without a per-tensor increment.
* Optional in the same update pass: gradient unscaling for ``torch.amp.GradScaler`` (a finite check
  skips the step), and clipping by the global gradient norm (``max_grad_norm``), where the norm is
  computed once, by a read-only pre-pass over the gradients, and the clip factor is applied inside
  the update.

Invariants: parameters of one group share a device; parameters and gradients are dense and
contiguous; states have the parameter dtype, or float32 with ``master_weights=True``.
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from . import _kernels

__all__ = ["FusedAdamW", "FusedAdam", "FusedSGD", "FusedAdagrad"]

# GradScaler still hands itself to optimizers whose step() takes `grad_scaler`, which is what lets
# unscaling and the finite check happen inside our single pass; it warns about a future change on
# every such call. The message is specific to that handshake, so silencing it hides nothing else.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


@dataclass
class _Bucket:
    """One kernel launch: the active parameters of a group that share dtype (and device)."""

    indices: list  # positions in group["params"]
    table: _kernels.KernelTable
    numels: list  # element count of each parameter, for the bulk check of new gradients


@dataclass
class _GroupPlan:
    """What the step of one param group needs, cached while the group's tensors do not change.

    ``watch`` (native, csrc/common/tensor_watch.h) records which positions have a gradient and the
    addresses the tables hold; its ``check`` compares the live tensors with that record in one C
    loop every step. Gradients are held by weak reference only: after
    ``zero_grad(set_to_none=True)`` the old gradients are freed as they would be with torch's
    optimizers, instead of living on in the cache until the next step."""

    params: list  # the group's params list object (identity is checked)
    key: tuple  # structure flags (amsgrad, momentum on/off): a change rebuilds the plan
    buckets: list
    device: torch.device
    active: list  # positions in params that have a gradient, in bucket order
    watch: Any = None

    def pick(self, grads: list) -> list:
        """The gradients of the active positions, in bucket order."""
        return [grads[i] for i in self.active] if len(self.active) < 2 else list(operator.itemgetter(*self.active)(grads))


_is_contiguous = torch.Tensor.is_contiguous
_numel = torch.Tensor.numel
_grad_of = operator.attrgetter("grad")
_dtype_of = operator.attrgetter("dtype")


class _FusedOptimizer(torch.optim.Optimizer):
    """Shared machinery; subclasses say which state tensors they keep and which kernel runs."""

    # torch.amp.GradScaler calls step(grad_scaler=...) instead of unscaling the gradients itself.
    _step_supports_amp_scaling = True
    # Names of the per-parameter state tensors, in kernel row order (state0, state1, state2).
    _state_names: tuple = ()
    # Whether state["step"] is part of torch's layout for this optimizer (not for SGD).
    _public_step: bool = True

    def __init__(self, params, defaults: dict, *, max_grad_norm: Optional[float] = None,
                 master_weights: bool = False) -> None:
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.master_weights = bool(master_weights)
        self._plans: dict = {}  # group index (or a step_subset key) -> _GroupPlan
        self._last_grad_norm: Optional[torch.Tensor] = None
        super().__init__(params, defaults)

    # ----- param groups and state -------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        device = None
        for pi, p in enumerate(group["params"]):
            name = self._param_name(gi, pi)
            if device is None:
                device = p.device
            elif p.device != device:
                raise ValueError(
                    f"parameter {name} is on {p.device} but earlier parameters of param group {gi} "
                    f"are on {device}: a fused optimizer needs each param group on one device"
                )
            _kernels.check_param(p, name)
        self._plans.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._plans.clear()  # the state tensors were replaced: rebuild every pointer table

    def _param_name(self, gi: int, pi: int) -> str:
        group = self.param_groups[gi]
        names = group.get("param_names")
        if names is not None and pi < len(names):
            return repr(names[pi])
        p = group["params"][pi]
        return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}, {p.dtype})"

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float32 if self.master_weights and p.dtype in _SIXTEEN_BIT else p.dtype

    def _uses_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype in _SIXTEEN_BIT

    def _state_tensor_names(self, group: dict) -> tuple:
        """The state tensors this group keeps (subclasses drop the ones an option disables)."""
        return self._state_names

    def _has_no_history(self, state: dict) -> bool:
        """Whether the parameter has never been stepped (decides SGD's first-step buffer)."""
        return len(state) == 0

    def _init_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """Create the state of a parameter on its first step, in torch's layout."""
        if self._public_step:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for name in self._state_tensor_names(group):
            state[name] = self._fresh_state(p, name, group)
        if self._uses_master(p):
            state["master_param"] = p.detach().float()

    def _fresh_state(self, p: torch.Tensor, name: str, group: dict) -> torch.Tensor:
        return torch.zeros_like(p, dtype=self._state_dtype(p), memory_format=torch.contiguous_format)

    def _conform_state(self, p: torch.Tensor, group: dict, state: dict, name: str) -> None:
        """Make a loaded state usable by the kernel: right dtype, device, shape and contiguity."""
        want = self._state_dtype(p)
        for key in self._state_tensor_names(group):
            t = state.get(key)
            if t is None:
                state[key] = self._fresh_state(p, key, group)
                continue
            if t.shape != p.shape:
                raise ValueError(
                    f"parameter {name}: state['{key}'] has shape {tuple(t.shape)} but the parameter has "
                    f"shape {tuple(p.shape)} (was the state dict saved for another model?)"
                )
            if t.dtype != want or t.device != p.device or not t.is_contiguous():
                state[key] = t.to(device=p.device, dtype=want, memory_format=torch.contiguous_format)
        if self._uses_master(p):
            m = state.get("master_param")
            if m is None or m.shape != p.shape:
                state["master_param"] = p.detach().float()
            elif m.dtype != torch.float32 or m.device != p.device or not m.is_contiguous():
                state["master_param"] = m.to(device=p.device, dtype=torch.float32,
                                             memory_format=torch.contiguous_format)
        elif "master_param" in state:
            del state["master_param"]
        if self._public_step and "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)

    # ----- plans: cached pointer tables -------------------------------------------------------

    def _structure_key(self, group: dict) -> tuple:
        return ()

    def _plan(self, gi: int, group: dict, grads: Optional[list] = None, key: object = None) -> _GroupPlan:
        """The cached plan of a group, refreshed as little as needed: when nothing changed, one
        native check (reads ``.grad``, compares identities and addresses); when only the gradient
        tensors changed (``zero_grad(set_to_none=True)`` + backward, every step), a bulk check of
        the new gradients and a rewrite of one table row; otherwise a rebuild. ``grads`` (default:
        every parameter's ``.grad``) and ``key`` (default: the group index) let :meth:`step_subset`
        cache plans over part of a group; None entries are skipped."""
        params = group["params"]
        key = gi if key is None else key
        plan = self._plans.get(key)
        if (plan is not None and plan.params is params and plan.key == self._structure_key(group)
                and self._owns_steps(plan)):
            status, picked = plan.watch.check(params, grads)
            if status == _kernels.WATCH_UNCHANGED:
                return plan  # the fast path: nothing changed since the last step
            if status == _kernels.WATCH_NEW_GRADS:
                self._refresh_grads(gi, plan, picked)  # same active set, new gradient tensors
                return plan
        if grads is None:
            grads = list(map(_grad_of, params))
        plan = self._build_plan(gi, group, grads)
        # A plan's tables own the step counts of its parameters (state["step"] are views into
        # them): plans over the same parameters under other keys now hold stale counts.
        self._plans = {k: v for k, v in self._plans.items()
                       if k == key or not isinstance(v, _GroupPlan) or v.params is not params
                       or not set(v.active).intersection(plan.active)}
        self._plans[key] = plan
        return plan

    def _owns_steps(self, plan: _GroupPlan) -> bool:
        """Whether the parameters' ``state["step"]`` are still views into this plan's step tensors
        (a plan built later over the same parameters takes them over)."""
        if not self._public_step or not plan.buckets:
            return True
        first = plan.buckets[0]
        return self.state[plan.params[first.indices[0]]]["step"]._base is first.table.steps

    def _refresh_grads(self, gi: int, plan: _GroupPlan, picked: list) -> None:
        """Point the tables at new gradient tensors. torch itself refuses a ``.grad`` of another
        shape or device (and of another dtype unless ``grad_dtype`` was changed), but ``g.data = x``
        can still change a gradient's size, so a bulk check of dtype, element count and contiguity
        runs; any failure falls back to the per-tensor checks, which name the parameter."""
        start = 0
        grad_ptrs = []
        for bucket in plan.buckets:
            new = picked[start:start + len(bucket.indices)]
            start += len(new)
            try:
                ok = (all(map(_is_contiguous, new)) and list(map(_numel, new)) == bucket.numels
                      and list(map(_dtype_of, new)).count(bucket.table.dtype) == len(new))
            except RuntimeError:  # sparse tensors have no is_contiguous(); check_grad names them
                ok = False
            if not ok:
                for g, i in zip(new, bucket.indices):
                    _kernels.check_grad(g, plan.params[i], self._param_name(gi, i))
            addrs = _kernels.data_ptrs(new)
            bucket.table.replace_grad_addresses(addrs)
            grad_ptrs += addrs
        plan.watch.set_grads(picked, grad_ptrs)

    def _build_plan(self, gi: int, group: dict, grads: list) -> _GroupPlan:
        params = group["params"]
        by_dtype: dict = {}
        fresh: dict = {}  # id(p) -> True if its state is created by this step
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                continue  # torch skips parameters without a gradient; so do we
            name = self._param_name(gi, i)
            _kernels.check_param(p, name)
            _kernels.check_grad(g, p, name)
            state = self.state[p]
            fresh[id(p)] = self._has_no_history(state)
            if len(state) == 0:
                self._init_state(p, group, state)
            else:
                self._conform_state(p, group, state, name)
            by_dtype.setdefault(p.dtype, []).append(i)
        buckets = [self._make_bucket(group, indices, grads, fresh) for indices in by_dtype.values()]
        device = params[0].device if params else torch.device("cpu")
        active = [i for b in buckets for i in b.indices]
        plan = _GroupPlan(params, self._structure_key(group), buckets, device, active)
        plan.watch = _kernels.tensor_watch(params, active, plan.pick(grads))
        return plan

    def _make_bucket(self, group: dict, indices: list, grads: list, fresh: dict) -> _Bucket:
        params = [group["params"][i] for i in indices]
        states = [self.state[p] for p in params]
        master = self._uses_master(params[0])
        names = self._state_tensor_names(group)
        rows = [[s.get(name) for s in states] for name in self._state_names]
        # Rows of disabled options (amsgrad off, momentum 0) stay null.
        rows = [r if name in names else [None] * len(params) for r, name in zip(rows, self._state_names)]
        masters = [s.get("master_param") for s in states]
        device = params[0].device
        if self._public_step:
            steps = torch.stack([s["step"].detach().to(device=device, dtype=torch.float32).reshape(())
                                 for s in states])
            for k, s in enumerate(states):
                s["step"] = steps[k]  # a 0-d view: the kernel's increment shows in the state
        else:
            # No step in torch's layout (SGD): a private count whose only use is "first step".
            steps = torch.tensor([0.0 if fresh.get(id(p), False) else 1.0 for p in params],
                                 dtype=torch.float32, device=device)
        table = _kernels.make_table(params, [grads[i] for i in indices], rows, masters, steps, master)
        return _Bucket(indices, table, [p.numel() for p in params])

    # ----- the step --------------------------------------------------------------------------

    @property
    def last_grad_norm(self) -> Optional[torch.Tensor]:
        """Global L2 norm of the (unscaled) gradients seen by the last step, as a 0-d float32 tensor
        on the parameters' device; None when the last step neither clipped nor unscaled."""
        return self._last_grad_norm

    def step(self, closure: Optional[Callable[[], Any]] = None, grad_scaler=None):
        """One optimizer step. ``grad_scaler`` is passed by ``torch.amp.GradScaler.step``: the
        gradients are then unscaled and checked for inf/NaN inside the fused pass, and the step is
        skipped (parameters, states and step counts unchanged) when any is not finite."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            plans = [(group, self._plan(gi, group)) for gi, group in enumerate(self.param_groups)]
            plans = [(group, plan) for group, plan in plans if plan.buckets]
            control = self._grad_control(plans, grad_scaler)
            if control is None:
                return loss  # skipped: a gradient was not finite
            threads = torch.get_num_threads()
            for group, plan in plans:
                for bucket in plan.buckets:
                    self._kernel(bucket.table, group, control, threads)
        return loss

    # ----- stepping a subset (trainpatterns.distributed: update each bucket once it is reduced) -----

    def step_subset(self, params: Iterable[torch.Tensor]) -> None:
        """Step only ``params`` (parameters of this optimizer) with their groups' current
        hyperparameters: the same update :meth:`step` gives them; the others keep their values and
        state, and parameters without a gradient are skipped. ``SyncDataParallel(optimizer=...)``
        calls it per bucket as soon as that bucket's all-reduce completes.

        The pointer tables of each subset are cached and refreshed exactly like the full step's
        (:meth:`_plan`, keyed by the subset; ``load_state_dict`` and ``add_param_group`` invalidate
        them too). A table owns the step counts of its parameters (``state["step"]`` are views into
        it), so building one drops the other tables over the same parameters. Not with
        ``max_grad_norm`` or a GradScaler: they need every gradient before any update."""
        if self.max_grad_norm is not None:
            raise RuntimeError("step_subset cannot clip by the global gradient norm (max_grad_norm is set): "
                               "the norm needs every gradient before the first update")
        params = list(params)
        key = ("subset", tuple(map(id, params)))
        where = self._plans.get(key)
        if where is None:  # (group index, positions in the group) of each requested parameter
            wanted = set(key[1])
            where = [(gi, [i for i, p in enumerate(g["params"]) if id(p) in wanted])
                     for gi, g in enumerate(self.param_groups)]
            where = [(gi, idx) for gi, idx in where if idx]
            if sum(len(idx) for _, idx in where) != len(wanted):
                raise ValueError("step_subset: some of the given tensors are not parameters of this optimizer")
            self._plans[key] = where
        control = _kernels.grad_control(1.0)
        threads = torch.get_num_threads()
        with torch.no_grad():
            for gi, idx in where:
                group = self.param_groups[gi]
                grads = [None] * len(group["params"])
                for i in idx:
                    grads[i] = group["params"][i].grad
                plan = self._plan(gi, group, grads, key + (gi,))
                for bucket in plan.buckets:
                    self._kernel(bucket.table, group, control, threads)

    def _kernel(self, table: _kernels.KernelTable, group: dict, control, threads: int) -> None:
        raise NotImplementedError

    def _grad_control(self, plans: list, grad_scaler):
        """The gradient multiplier for this step (loss-scale reciprocal times clip factor), or None
        when the step must be skipped. Runs the norm pre-pass when clipping or unscaling needs it."""
        scaler_state = None
        inv_scale = None  # None: gradients are not scaled
        already_found = None  # found_inf tensors recorded by an earlier scaler.unscale_(self)
        if grad_scaler is not None and getattr(grad_scaler, "_enabled", True):
            scaler_state = grad_scaler._per_optimizer_states[id(self)]
            from torch.amp.grad_scaler import OptState

            if scaler_state["stage"] is OptState.UNSCALED:
                already_found = list(scaler_state["found_inf_per_device"].values())
            else:
                inv_scale = grad_scaler._get_scale_async().double().reciprocal().float()
        elif getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            # GradScaler's newer protocol: it sets these attributes and has checked the gradients.
            if getattr(self, "grad_scale", None) is not None:
                inv_scale = self.grad_scale.double().reciprocal().float()
            if getattr(self, "found_inf", None) is not None:
                already_found = [self.found_inf]

        devices = {plan.device for _, plan in plans}
        need_norm = self.max_grad_norm is not None or (scaler_state is not None and inv_scale is not None)
        if not plans:
            if scaler_state is not None and inv_scale is not None:
                scaler_state["found_inf_per_device"] = {
                    grad_scaler._scale.device: torch.zeros((), dtype=torch.float32, device=grad_scaler._scale.device)}
            return _kernels.grad_control(1.0)
        if devices == {torch.device("cpu")}:
            return self._grad_control_cpu(plans, inv_scale, already_found, scaler_state, need_norm)
        if len(devices) > 1 or next(iter(devices)).type != "cuda":
            if need_norm or already_found:
                raise ValueError(
                    f"max_grad_norm and GradScaler need all parameters of the optimizer on one device, "
                    f"found {sorted(str(d) for d in devices)}")
            return _kernels.grad_control(1.0)
        return self._grad_control_cuda(plans, next(iter(devices)), inv_scale, already_found,
                                       scaler_state, need_norm)

    def _grad_control_cpu(self, plans, inv_scale, already_found, scaler_state, need_norm):
        if already_found and any(float(f) != 0.0 for f in already_found):
            return None
        inv = 1.0 if inv_scale is None else float(inv_scale)
        if not need_norm:
            self._last_grad_norm = None
            return _kernels.grad_control(inv)
        threads = torch.get_num_threads()
        sumsq = sum(_kernels.grad_sumsq_cpu(b.table, threads) for _, plan in plans for b in plan.buckets)
        norm = math.sqrt(sumsq) * inv
        self._last_grad_norm = torch.tensor(norm, dtype=torch.float32)
        if scaler_state is not None and inv_scale is not None:
            found = 0.0 if math.isfinite(norm) else 1.0
            scaler_state["found_inf_per_device"] = {inv_scale.device: torch.tensor(found, dtype=torch.float32)}
            if found:
                return None
        clip = 1.0
        if self.max_grad_norm is not None:
            clip = self.max_grad_norm / (norm + 1e-6)
            if clip == clip:  # torch.clamp(max=1) keeps NaN, and so do we
                clip = min(clip, 1.0)
        return _kernels.grad_control(inv * clip)

    def _grad_control_cuda(self, plans, device, inv_scale, already_found, scaler_state, need_norm):
        skip = None
        if already_found:
            skip = torch.stack([f.to(device=device, dtype=torch.float32) for f in already_found]).sum()
        if not need_norm:
            self._last_grad_norm = None
            if inv_scale is None:
                return _kernels.grad_control(1.0, skip_dev=skip)
            # Unscale without a norm pass (the scaler already checked): multiplier from the device.
            # (Tensors freed after the launch are safe: the caching allocator is stream-ordered.)
            grad_mul = inv_scale.to(device=device, dtype=torch.float32).reshape(())
            return _kernels.grad_control(1.0, grad_mul_dev=grad_mul, skip_dev=skip)
        sumsq = torch.zeros((), dtype=torch.float64, device=device)
        for _, plan in plans:
            for b in plan.buckets:
                _kernels.grad_sumsq_cuda(b.table, sumsq)
        norm = torch.empty((), dtype=torch.float32, device=device)
        if skip is None:
            skip = torch.zeros((), dtype=torch.float32, device=device)
        grad_mul = torch.empty((), dtype=torch.float32, device=device)
        inv_dev = None if inv_scale is None else inv_scale.to(device=device, dtype=torch.float32).reshape(())
        _kernels.finish_grad_control_cuda(sumsq, inv_dev, self.max_grad_norm or 0.0, norm, skip, grad_mul)
        self._last_grad_norm = norm
        if scaler_state is not None and inv_scale is not None:
            scaler_state["found_inf_per_device"] = {device: skip}
            return _kernels.grad_control(1.0, grad_mul_dev=grad_mul, skip_dev=skip)
        # No scaler: like clip_grad_norm_ + step, a non-finite norm is not a reason to skip.
        return _kernels.grad_control(1.0, grad_mul_dev=grad_mul, skip_dev=skip if already_found else None)


def _check_common(lr, eps: Optional[float] = None, weight_decay: float = 0.0) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("a tensor lr must have one element")
    elif not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps is not None and not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class _AdamBase(_FusedOptimizer):
    _state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _decoupled(self, group: dict) -> bool:
        return True

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 max_grad_norm: Optional[float] = None, master_weights: bool = False) -> None:
        _check_common(lr, eps, weight_decay)
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, master_weights=master_weights)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)

    def _structure_key(self, group: dict) -> tuple:
        return (bool(group["amsgrad"]),)

    def _state_tensor_names(self, group: dict) -> tuple:
        return self._state_names if group["amsgrad"] else self._state_names[:2]

    def _kernel(self, table, group, control, threads):
        beta1, beta2 = group["betas"]
        _kernels.adam_step(table, control, lr=group["lr"], beta1=float(beta1), beta2=float(beta2),
                           eps=group["eps"], weight_decay=group["weight_decay"], decoupled=self._decoupled(group),
                           amsgrad=group["amsgrad"], maximize=group["maximize"], num_threads=threads)


class FusedAdamW(_AdamBase):
    """AdamW (decoupled weight decay) with a fused native step. Same arguments and defaults as
    ``torch.optim.AdamW`` (lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2), plus:

    * ``max_grad_norm``: clip by the global L2 norm of all gradients (as ``clip_grad_norm_``) inside
      the update; the norm of the last step is ``last_grad_norm``.
    * ``master_weights``: for float16/bfloat16 parameters keep an fp32 master copy
      (``state["master_param"]``) and fp32 states; the 16-bit parameter is rewritten in the same pass.
    """


class FusedAdam(_AdamBase):
    """Adam (L2 weight decay added to the gradient) with a fused native step. Same arguments and
    defaults as ``torch.optim.Adam`` (weight_decay=0), plus ``max_grad_norm`` and ``master_weights``
    as in :class:`FusedAdamW`. ``decoupled_weight_decay=True`` makes it AdamW, as in torch."""

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 decoupled_weight_decay: bool = False, max_grad_norm: Optional[float] = None,
                 master_weights: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         max_grad_norm=max_grad_norm, master_weights=master_weights)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", decoupled_weight_decay)
        self.defaults["decoupled_weight_decay"] = decoupled_weight_decay

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", False)

    def _decoupled(self, group: dict) -> bool:
        return bool(group.get("decoupled_weight_decay", False))


class FusedSGD(_FusedOptimizer):
    """SGD with momentum, dampening, Nesterov, weight decay and maximize, fused. Same arguments and
    defaults as ``torch.optim.SGD`` (lr=1e-3), plus ``max_grad_norm`` and ``master_weights``.
    ``state["momentum_buffer"]`` exists only when momentum is nonzero, as in torch."""

    _state_names = ("momentum_buffer",)
    _public_step = False

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, max_grad_norm: Optional[float] = None, master_weights: bool = False) -> None:
        _check_common(lr, None, weight_decay)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, master_weights=master_weights)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    def _structure_key(self, group: dict) -> tuple:
        return (group["momentum"] != 0,)

    def _state_tensor_names(self, group: dict) -> tuple:
        return self._state_names if group["momentum"] != 0 else ()

    def _has_no_history(self, state: dict) -> bool:
        # torch starts the momentum buffer from the gradient when there is none yet.
        return state.get("momentum_buffer") is None

    def _kernel(self, table, group, control, threads):
        _kernels.sgd_step(table, control, lr=group["lr"], momentum=group["momentum"],
                          dampening=group["dampening"], weight_decay=group["weight_decay"],
                          nesterov=group["nesterov"], maximize=group["maximize"], num_threads=threads)


class FusedAdagrad(_FusedOptimizer):
    """Adagrad with lr_decay, weight decay, initial_accumulator_value, eps and maximize, fused. Same
    arguments and defaults as ``torch.optim.Adagrad`` (lr=1e-2, eps=1e-10), plus ``max_grad_norm``
    and ``master_weights``."""

    _state_names = ("sum",)

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0, eps: float = 1e-10, *,
                 maximize: bool = False, max_grad_norm: Optional[float] = None, master_weights: bool = False) -> None:
        _check_common(lr, eps, weight_decay)
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, maximize=maximize)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, master_weights=master_weights)
        # torch creates Adagrad's state at construction, not at the first step.
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(p, group, self.state[p])

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def _fresh_state(self, p, name, group):
        return torch.full_like(p, group["initial_accumulator_value"], dtype=self._state_dtype(p),
                               memory_format=torch.contiguous_format)

    def _kernel(self, table, group, control, threads):
        _kernels.adagrad_step(table, control, lr=group["lr"], lr_decay=group["lr_decay"],
                              weight_decay=group["weight_decay"], eps=group["eps"],
                              maximize=group["maximize"], num_threads=threads)
