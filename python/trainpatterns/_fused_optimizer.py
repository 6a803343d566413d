"""The machinery shared by the fused optimizers (optim.py): state in torch's layout, cached pointer
tables, and the step.

Each algorithm (AdamW, SGD, ...) only says which state tensors it keeps and which kernel runs;
everything else is here. What makes a step fast beyond the kernel:

* Pointer tables are built once per param group and reused while the parameters do not change;
  new gradient tensors (``zero_grad(set_to_none=True)`` + backward, every step) are checked and
  written into the tables' gradient row by the same native call that checks the parameters.
* Step counts live in one float tensor per table that the kernel increments; ``state["step"]``
  entries are 0-d views into it, so the state keeps torch's layout without a per-tensor increment.
* Unscaling, the finite check and clipping are decided once per step (_grad_control.py) and
  applied inside the same update pass.

Invariants: parameters of one group share a device; parameters and gradients are dense and
contiguous; states have the parameter dtype, or float32 with ``master_weights=True``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.optim.optimizer as _torch_optimizer

from . import _kernels
from ._grad_control import GradControl

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


@dataclass
class _Bucket:
    """One kernel launch: the active parameters of a group that share dtype (and device)."""

    indices: list  # positions in group["params"]
    table: _kernels.KernelTable


@dataclass
class _GroupPlan:
    """What the step of one param group needs, cached while the group's tensors do not change.

    ``watch`` (native, csrc/common/tensor_watch.h) records which positions have a gradient and what
    the tables hold (addresses, element counts, dtypes); its ``refresh`` compares the live tensors
    with that record in one C loop every step, storage bounds included, and points the tables at
    new gradient tensors that fit (nothing else touches the gradient row after the build). No
    gradient is held: after ``zero_grad(set_to_none=True)`` the old gradients are freed as they
    would be with torch's optimizers, instead of living on in the cache until the next step."""

    params: list  # the group's params list object (identity is checked)
    key: tuple  # structure flags (amsgrad, momentum on/off): a change rebuilds the plan
    buckets: list
    device: torch.device
    active: list  # positions in params that have a gradient, in bucket order
    watch: Any = None

    def pick(self, grads: list) -> list:
        """The gradients of the active positions, in bucket order."""
        return [grads[i] for i in self.active] if len(self.active) < 2 else list(operator.itemgetter(*self.active)(grads))

    def upload_rows(self) -> None:
        """Make the kernels see gradient addresses the watch wrote into the host rows (a copy per
        table on CUDA; nothing to do on the CPU, where the kernels read the host rows)."""
        if self.device.type == "cuda":
            for bucket in self.buckets:
                bucket.table.upload_rows()


_grad_of = operator.attrgetter("grad")
# torch.optim's global step pre and post hooks (register_optimizer_step_pre_hook, ...).
_GLOBAL_STEP_HOOKS = tuple(getattr(_torch_optimizer, name, {}) for name in (
    "_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"))


class FusedOptimizer(torch.optim.Optimizer):
    """Base of the fused optimizers; subclasses say which state tensors they keep (``_state_names``)
    and which kernel runs (``_kernel``)."""

    # torch.amp.GradScaler calls step(grad_scaler=...) instead of unscaling the gradients itself
    # (_grad_control.py does it inside the update pass).
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
        # group index, or a step_subset key + group index -> _GroupPlan; a step_subset key alone ->
        # where that subset's parameters are in the groups
        self._plans: dict = {}
        self._grad_control = GradControl()
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
        # Loaded or hand-edited states reach the kernels as they are: their storage must hold them.
        for key in (*self._state_tensor_names(group), "master_param"):
            if key in state:
                _kernels.check_storage(state[key], f"parameter {name}: state['{key}']")
        if self._public_step and "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)

    # ----- plans: cached pointer tables -------------------------------------------------------

    def _structure_key(self, group: dict) -> tuple:
        return ()

    def _plan(self, gi: int, group: dict, grads: Optional[list] = None, key: object = None) -> _GroupPlan:
        """The cached plan of a group, refreshed as little as needed: one native call reads every
        ``.grad`` and compares each parameter (identity, address, size, bounds) and each gradient
        (address, size, dtype, device, bounds, lazy view) with what the tables hold; when only
        gradient addresses changed (``zero_grad(set_to_none=True)`` + backward, every step), it
        writes them into the tables. Anything else (a gradient that does not fit included: the
        rebuild's checks name it) rebuilds the plan. ``grads`` (default: every parameter's
        ``.grad``) and ``key`` (default: the group index) let :meth:`step_subset` cache plans over
        part of a group; None entries are skipped."""
        params = group["params"]
        key = gi if key is None else key
        plan = self._plans.get(key)
        if (plan is not None and plan.params is params and plan.key == self._structure_key(group)
                and self._owns_steps(plan)):
            status = plan.watch.refresh(params, grads)
            if status == _kernels.WATCH_UNCHANGED:
                return plan  # the fast path: the tables hold valid addresses
            if status == _kernels.WATCH_NEW_GRADS:
                plan.upload_rows()
                return plan  # same active set, new gradient tensors, already in the host rows
        if grads is None:
            grads = list(map(_grad_of, params))
        with torch.no_grad():  # states are made from parameters, which may require grad
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
        plan.watch = _kernels.tensor_watch(params, active, plan.pick(grads), [b.table.host_rows for b in buckets])
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
        return _Bucket(indices, table)

    # ----- the step --------------------------------------------------------------------------

    @property
    def last_grad_norm(self) -> Optional[torch.Tensor]:
        """Global L2 norm of the (unscaled) gradients seen by the last step, as a 0-d float32 tensor
        on the parameters' device; None when the last step neither clipped nor unscaled."""
        return self._grad_control.last_norm

    def _step(self, closure: Optional[Callable[[], Any]] = None, grad_scaler=None):
        # No autograd-visible work happens here outside a plan build, which disables grad itself:
        # the rest needs no grad mode switch (two of them cost ~10 us a step with cold caches).
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [(group, self._plan(gi, group)) for gi, group in enumerate(self.param_groups)]
        plans = [(group, plan) for group, plan in plans if plan.buckets]
        tables = [bucket.table for _, plan in plans for bucket in plan.buckets]
        control = self._grad_control.for_step(self, tables, self.max_grad_norm, grad_scaler)
        if control is None:
            return loss  # skipped: a gradient was not finite
        threads = torch.get_num_threads()
        for group, plan in plans:
            for bucket in plan.buckets:
                self._kernel(bucket.table, group, control, threads)
        return loss

    # torch's wrapper of step(): a profiler annotation, the step hooks and a profiler entry point.
    _observed_step = torch.optim.Optimizer.profile_hook_step(_step)

    def step(self, closure: Optional[Callable[[], Any]] = None, grad_scaler=None):
        """One optimizer step. ``grad_scaler`` is passed by ``torch.amp.GradScaler.step``: the
        gradients are then unscaled and checked for inf/NaN inside the fused pass, and the step is
        skipped (parameters, states and step counts unchanged) when any is not finite.

        Step hooks (``register_step_pre_hook``/``post_hook``, global ones included) run, and the
        profiler sees the step, exactly as torch.optim arranges it; torch's wrapper is only entered
        when there is a hook or a running profiler, because it costs tens of microseconds a step
        once the kernel has pushed its code and data out of the caches."""
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _GLOBAL_STEP_HOOKS[0]
                or _GLOBAL_STEP_HOOKS[1] or torch.autograd._profiler_enabled()):
            args = () if closure is None else (closure,)
            return self._observed_step(*args, **({} if grad_scaler is None else {"grad_scaler": grad_scaler}))
        return self._step(closure, grad_scaler)

    step.hooked = True  # torch.optim then leaves step() as it is instead of wrapping it

    # ----- stepping a subset (trainpatterns.distributed: update each bucket once it is reduced) -----

    def step_subset(self, params: Iterable[torch.Tensor]) -> None:
        """Step only ``params`` (parameters of this optimizer) with their groups' current
        hyperparameters: the same update :meth:`step` gives them; the others keep their values and
        state, and parameters without a gradient are skipped. ``SyncDataParallel(optimizer=...)``
        calls it per bucket as soon as that bucket's all-reduce completes (the
        ``SupportsStepSubset`` protocol of optim.py).

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
