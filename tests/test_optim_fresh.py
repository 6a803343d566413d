"""Fused optimizers in the default training loop: new gradient tensors every step.

``optimizer.zero_grad()`` sets gradients to None, so backward makes new ``.grad`` tensors before
every step; the step then points its cached tables at them in the same native call that checks
the parameters (csrc/common/tensor_watch.h). Everything here compares with torch.optim element by
element (tolerances as tests/test_optim.py), over several steps, on odd sizes and on 1000 tiny
tensors, and checks that a gradient that does not fit is a clear error before anything is updated.
"""
from __future__ import annotations

import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch.optim.optimizer import register_optimizer_step_pre_hook

from trainpatterns.optim import FusedAdagrad, FusedAdam, FusedAdamW, FusedSGD

ODD_SIZES = [(278011,), (17, 3), (0,), (1,), (1024,), (5, 7, 3)]
TOL = dict(atol=1e-6, rtol=1e-5)
PAIRS = [
    (torch.optim.AdamW, FusedAdamW, dict(lr=1e-2, weight_decay=0.1)),
    (torch.optim.AdamW, FusedAdamW, dict(lr=1e-2, amsgrad=True, maximize=True)),
    (torch.optim.Adam, FusedAdam, dict(lr=1e-2, weight_decay=0.1)),
    (torch.optim.SGD, FusedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    (torch.optim.Adagrad, FusedAdagrad, dict(lr=1e-2, lr_decay=0.01)),
]


def pair(ref_cls, ours_cls, kw, sizes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in sizes]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    return a, b, ref_cls(a, **kw, foreach=False), ours_cls(b, **kw)


def assert_same(a, b, ref, ours):
    """Parameters and every state tensor, element by element."""
    for x, y in zip(a, b):
        torch.testing.assert_close(y.detach(), x.detach(), **TOL)
        for key, value in ref.state[x].items():
            if torch.is_tensor(value):
                torch.testing.assert_close(ours.state[y][key].reshape(value.shape), value, **TOL)


def fresh_step(a, b, ref, ours, gen, scale=1.0):
    """zero_grad(set_to_none=True), then new gradient tensors for both, then a step."""
    ref.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    for x, y in zip(a, b):
        g = torch.randn(x.shape, generator=gen, dtype=x.dtype) * scale
        x.grad, y.grad = g.clone(), g.clone()
    ref.step()
    ours.step()


@pytest.mark.parametrize("ref_cls,ours_cls,kw", PAIRS, ids=lambda v: getattr(v, "__name__", ""))
def test_fresh_gradients_every_step_match_torch(ref_cls, ours_cls, kw):
    a, b, ref, ours = pair(ref_cls, ours_cls, kw, ODD_SIZES)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        fresh_step(a, b, ref, ours, gen)
    assert_same(a, b, ref, ours)


def test_fresh_gradients_from_backward_match_torch_and_keep_the_plan():
    """The real loop, with backward making the gradients; the cached tables are refreshed in place,
    never rebuilt (a rebuild every step would be the slow path)."""
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 3))
    model_b = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 3))
    model_b.load_state_dict(model_a.state_dict())
    ref = torch.optim.AdamW(model_a.parameters(), lr=1e-2, foreach=False)
    ours = FusedAdamW(model_b.parameters(), lr=1e-2)
    x, y = torch.randn(64, 13), torch.randn(64, 3)
    plan = None
    for step in range(12):
        for model, opt in ((model_a, ref), (model_b, ours)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        if step == 1:
            plan, tables = ours._plans[0], [b.table for b in ours._plans[0].buckets]
        elif step > 1:
            assert ours._plans[0] is plan and [b.table for b in plan.buckets] == tables
    assert_same(list(model_a.parameters()), list(model_b.parameters()), ref, ours)


def test_thousand_tiny_tensors_with_fresh_gradients():
    gen = torch.Generator().manual_seed(2)
    sizes = [(int(n),) for n in torch.randint(1, 9, (1000,), generator=gen)]
    a, b, ref, ours = pair(torch.optim.AdamW, FusedAdamW, dict(lr=1e-2), sizes, seed=3)
    pools = [[torch.randn(s, generator=gen) for s in sizes] for _ in range(2)]
    for step in range(6):
        for x, y, g in zip(a, b, pools[step % 2]):  # two sets of gradient tensors in turns
            x.grad, y.grad = g.clone(), g
        ref.step()
        ours.step()
    assert_same(a, b, ref, ours)


def test_fresh_gradients_in_several_groups_and_dtypes():
    """Groups with their own hyperparameters, and a group of two dtypes (two tables behind one
    check)."""
    sizes = [(33,), (4, 5), (1,), (129,)]
    a32, b32, _, _ = pair(torch.optim.AdamW, FusedAdamW, {}, sizes)
    a64, b64, _, _ = pair(torch.optim.AdamW, FusedAdamW, {}, sizes, dtype=torch.float64)
    mixed_a, mixed_b = [a32[0], a64[0], a32[1], a64[1]], [b32[0], b64[0], b32[1], b64[1]]
    rest_a, rest_b = a32[2:] + a64[2:], b32[2:] + b64[2:]
    ref = torch.optim.AdamW([{"params": mixed_a}, {"params": rest_a, "lr": 3e-3}], lr=1e-2, foreach=False)
    ours = FusedAdamW([{"params": mixed_b}, {"params": rest_b, "lr": 3e-3}], lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        fresh_step(mixed_a + rest_a, mixed_b + rest_b, ref, ours, gen)
    assert len(ours._plans[0].buckets) == 2
    assert_same(mixed_a + rest_a, mixed_b + rest_b, ref, ours)


# One step of one parameter: what happens to its gradient before the step.
ACTIONS = ["fresh", "keep", "same memory, new object", "new values in place", "none"]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12),
       steps=st.lists(st.lists(st.sampled_from(ACTIONS), min_size=12, max_size=12), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_any_sequence_of_gradient_changes_matches_torch(sizes, steps, seed):
    """Whatever happens to each gradient between steps (new tensor, kept, a new object over the same
    memory, new values written in place, no gradient), the result equals torch's, element by element."""
    gen = torch.Generator().manual_seed(seed)
    a, b, ref, ours = pair(torch.optim.AdamW, FusedAdamW, dict(lr=1e-2), [(n,) for n in sizes], seed=seed)
    for actions in steps:
        for x, y, action in zip(a, b, actions):
            g = torch.randn(x.shape, generator=gen)
            if action == "none" or (action != "fresh" and y.grad is None):
                x.grad = y.grad = None
            elif action == "fresh":
                x.grad, y.grad = g.clone(), g
            elif action == "same memory, new object":
                y.grad = y.grad.detach()
            elif action == "new values in place":
                x.grad.copy_(g)
                y.grad.copy_(g)
        ref.step()
        ours.step()
    assert_same(a, b, ref, ours)


@pytest.mark.parametrize("others", ["fresh", "kept"])
@pytest.mark.parametrize("change,error,match", [
    (lambda p: setattr(p, "grad", torch.randn(p.shape, dtype=torch.float64)), TypeError, "gradient dtype"),
    (lambda p: setattr(p.grad, "data", torch.randn(p.numel() + 1)), ValueError, "gradient shape"),
    (lambda p: setattr(p, "grad", torch.randn(p.numel() * 2)[::2].view(p.shape)), ValueError, "not contiguous"),
    (lambda p: setattr(p, "grad", torch._neg_view(torch.randn(p.shape))), ValueError, "lazy negated"),
    (lambda p: setattr(p.grad, "data", torch._neg_view(p.grad.data)), ValueError, "lazy negated"),
], ids=["dtype", "shape", "strided", "new-neg-view", "negated-in-place"])
def test_a_gradient_that_does_not_fit_is_a_clear_error_and_nothing_moves(change, error, match, others):
    """Among many parameters whose gradients are new tensors (or the ones of the last step), one
    whose gradient no longer fits: the error names that parameter, and no parameter, state or step
    count has changed."""
    params = [torch.nn.Parameter(torch.randn(7)) for _ in range(50)]
    ours = FusedAdamW(params, lr=1e-2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(7)
        ours.step()
    if others == "fresh":
        for p in params:
            p.grad = torch.randn(7)
    params[31].grad_dtype = None  # torch then accepts a gradient of another dtype
    change(params[31])
    before = [p.detach().clone() for p in params]
    state = {k: [ours.state[p][k].clone() for p in params] for k in ("step", "exp_avg", "exp_avg_sq")}
    with pytest.raises(error, match=rf"param_groups\[0\]\['params'\]\[31\].*{match}"):
        ours.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before))
    for key, values in state.items():
        assert all(torch.equal(ours.state[p][key], v) for p, v in zip(params, values))
    params[31].grad = torch.randn(7)  # fixed: the next step goes through
    ours.step()
    assert not torch.equal(params[31].detach(), before[31])


def test_fresh_gradients_are_freed_at_once():
    """Nothing holds a gradient after the step that used it: zero_grad(set_to_none=True) frees
    it at once, as with torch's optimizers."""
    params = [torch.nn.Parameter(torch.randn(9)) for _ in range(3)]
    ours = FusedAdamW(params)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(9)
        ours.step()
        refs = [weakref.ref(p.grad) for p in params]
        ours.zero_grad(set_to_none=True)
        assert all(r() is None for r in refs)


def test_step_subset_with_fresh_gradients_equals_step():
    sizes = [(10,), (3, 3), (1,), (64,)]
    a, b, _, _ = pair(torch.optim.AdamW, FusedAdamW, {}, sizes)
    full, subset = FusedAdamW(a, lr=1e-2), FusedAdamW(b, lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen)
            x.grad, y.grad = g.clone(), g
        full.step()
        subset.step_subset(b[:2])
        subset.step_subset(b[2:])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fresh_gradients_match_torch():
    """On the GPU new gradient addresses reach the kernels through a new device copy of the rows."""
    a, b, ref, ours = pair(torch.optim.AdamW, FusedAdamW, dict(lr=1e-2), ODD_SIZES)
    for t in (*a, *b):
        t.data = t.data.cuda()
    ref, ours = torch.optim.AdamW(a, lr=1e-2, foreach=False), FusedAdamW(b, lr=1e-2)
    gen = torch.Generator().manual_seed(6)
    for _ in range(6):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).cuda()
            x.grad, y.grad = g.clone(), g
        ref.step()
        ours.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y.detach().cpu(), x.detach().cpu(), **TOL)


def test_step_hooks_and_profiler_see_every_step():
    """Step hooks (the optimizer's and global ones) and the profiler's annotation work as with
    torch's optimizers, whether or not they were registered before the first step."""
    p = torch.nn.Parameter(torch.randn(6))
    ours = FusedAdamW([p], lr=1e-2)
    calls = []
    p.grad = torch.randn(6)
    ours.step()  # no hook yet
    pre = ours.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt, args, kwargs)))
    post = ours.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt, args, kwargs)))
    glob = register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append(("global",)))
    try:
        ours.step()
        closure_loss = ours.step(lambda: torch.tensor(3.0))
    finally:
        pre.remove()
        post.remove()
        glob.remove()
    ours.step()  # hooks removed: not called
    assert [c[0] for c in calls] == ["global", "pre", "post", "global", "pre", "post"]
    assert calls[1][1] is ours and calls[1][2] == (ours,) and calls[1][3] == {}
    assert len(calls[4][2]) == 2 and float(closure_loss) == 3.0
    assert int(ours.state[p]["step"]) == 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours.step()
    assert any(e.name == "Optimizer.step#FusedAdamW.step" for e in prof.events())


@pytest.mark.parametrize("master", [False, True])
def test_step_leaves_no_autograd_trace(master):
    """A step taken with grad mode on (as in a training loop) changes no parameter into a non-leaf
    and creates states that do not require grad, first step (states created) and later ones."""
    params = [torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16 if master else torch.float32))
              for _ in range(3)]
    ours = FusedAdamW(params, lr=1e-2, master_weights=master)
    with torch.enable_grad():
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            ours.step()
    for p in params:
        assert p.is_leaf and p.requires_grad and p.grad_fn is None
        assert not any(t.requires_grad for t in ours.state[p].values() if torch.is_tensor(t))
