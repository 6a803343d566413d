"""Fused optimizers against torch.optim, element by element.

References: torch's for-loop implementations (foreach=False) for float32/float64 and torch's own
fused CPU kernels for float16/bfloat16 (both compute in fp32 and round once, as ours do).
Tolerances: fp32 atol 1e-6 / rtol 1e-5 after 20+ steps (ANCHORS: fused vs for-loop differ by
~1.5e-8 per step); fp64 1e-12; 16-bit 8 units in the last place of the format: a one-unit
difference in a stored 16-bit state (from a different operation order) is amplified by momentum,
up to 1/(1 - beta) = 10x, over the following steps.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import trainpatterns as tp
from trainpatterns.optim import FusedAdagrad, FusedAdam, FusedAdamW, FusedSGD

ODD_SIZES = [(278011,), (17, 3), (0,), (1,), (1024,)]
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       torch.bfloat16: dict(atol=8 * 2**-8, rtol=8 * 2**-8), torch.float16: dict(atol=8 * 2**-11, rtol=8 * 2**-11)}

CASES = [
    (torch.optim.AdamW, FusedAdamW, dict(lr=1e-2)),
    (torch.optim.AdamW, FusedAdamW, dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)),
    (torch.optim.AdamW, FusedAdamW, dict(lr=1e-2, amsgrad=True, maximize=True)),
    (torch.optim.AdamW, FusedAdamW, dict(lr=1e-2, betas=(0.3, 0.9))),  # 1 - beta1 >= 0.5: other lerp branch
    (torch.optim.Adam, FusedAdam, dict(lr=1e-2)),
    (torch.optim.Adam, FusedAdam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (torch.optim.Adam, FusedAdam, dict(lr=1e-2, weight_decay=0.1, maximize=True, decoupled_weight_decay=True)),
    (torch.optim.SGD, FusedSGD, dict(lr=1e-2)),
    (torch.optim.SGD, FusedSGD, dict(lr=1e-2, momentum=0.9)),
    (torch.optim.SGD, FusedSGD, dict(lr=1e-2, momentum=0.9, dampening=0.3, weight_decay=0.05)),
    (torch.optim.SGD, FusedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True)),
    (torch.optim.Adagrad, FusedAdagrad, dict(lr=1e-2)),
    (torch.optim.Adagrad, FusedAdagrad,
     dict(lr=1e-2, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.2, eps=1e-6, maximize=True)),
]


def _ids(case):
    ref, ours, kw = case
    return ours.__name__ + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


def make_params(sizes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float32).to(dtype) for s in sizes]


def run_pair(ref_cls, ours_cls, kw, sizes=ODD_SIZES, dtype=torch.float32, steps=20, ref_kw=None,
             ours_kw=None, seed=0):
    """Step a torch optimizer and ours on identical parameters and gradients; return both lists."""
    init = make_params(sizes, dtype, seed)
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    ref = ref_cls(a, **kw, **(ref_kw or {"foreach": False}))
    ours = ours_cls(b, **kw, **(ours_kw or {}))
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for x, y in zip(a, b):
            grad = torch.randn(x.shape, generator=gen).to(dtype)
            x.grad = grad.clone()
            y.grad = grad.clone()
        ref.step()
        ours.step()
    return a, b, ref, ours


def assert_close_lists(xs, ys, dtype):
    for x, y in zip(xs, ys):
        torch.testing.assert_close(y.detach(), x.detach(), **TOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_for_loop(case, dtype):
    ref_cls, ours_cls, kw = case
    a, b, ref, ours = run_pair(ref_cls, ours_cls, kw, dtype=dtype, steps=21)
    assert_close_lists(a, b, dtype)
    # The optimizer state agrees too, in torch's layout.
    for pa, pb in zip(a, b):
        sa, sb = ref.state[pa], ours.state[pb]
        assert set(sa) == set(sb), (set(sa), set(sb))
        for key in sa:
            if key == "step":
                assert float(sb[key]) == float(sa[key])
                assert sb[key].dtype == torch.float32 and sb[key].dim() == 0
            else:
                torch.testing.assert_close(sb[key], sa[key], **TOL[dtype])


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5], CASES[10], CASES[12]], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_matches_rounded_fp32_reference(case, dtype):
    """16-bit parameters and states, maths in fp32, one rounding per stored value. Reference: the
    torch for-loop optimizer on fp32 copies whose parameters and states are rounded to the 16-bit
    format after every step. (torch's fused CPU SGD is not usable as a reference here: in 2.13 its
    bfloat16 momentum buffer drifts from the for-loop one by ~4 after two steps.)"""
    ref_cls, ours_cls, kw = case
    init = make_params(ODD_SIZES, dtype)
    a = [torch.nn.Parameter(t.float()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    ref, ours = ref_cls(a, **kw, foreach=False), ours_cls(b, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).to(dtype)
            x.grad, y.grad = g.float(), g.clone()
        ref.step()
        ours.step()
        with torch.no_grad():  # store as the 16-bit format would
            for x in a:
                x.copy_(x.to(dtype).float())
                for key, value in ref.state[x].items():
                    if key != "step" and torch.is_tensor(value):
                        value.copy_(value.to(dtype).float())
    assert_close_lists([x.to(dtype) for x in a], b, dtype)
    for x, y in zip(a, b):
        for key, value in ref.state[x].items():
            if key != "step":
                assert ours.state[y][key].dtype == dtype
                torch.testing.assert_close(ours.state[y][key], value.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("ours_cls,ref_cls,kw", [
    (FusedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (FusedSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    (FusedAdagrad, torch.optim.Adagrad, dict(lr=1e-2, lr_decay=0.01)),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_track_fp32_reference(ours_cls, ref_cls, kw, dtype):
    """With master_weights the 16-bit parameter is the rounded fp32 master, and the master follows
    torch's fp32 trajectory given the same (16-bit) gradients."""
    init = make_params(ODD_SIZES, torch.float32)
    p16 = [torch.nn.Parameter(t.to(dtype)) for t in init]
    p32 = [torch.nn.Parameter(t.to(dtype).float()) for t in init]
    ours = ours_cls(p16, **kw, master_weights=True)
    ref = ref_cls(p32, **kw, foreach=False)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        for x, y in zip(p16, p32):
            g = torch.randn(x.shape, generator=gen).to(dtype)
            x.grad = g
            y.grad = g.float()
        ours.step()
        ref.step()
    for x, y in zip(p16, p32):
        master = ours.state[x]["master_param"]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master, y.detach(), atol=1e-6, rtol=1e-5)
        assert torch.equal(x.detach(), master.to(dtype))
        for key, value in ours.state[x].items():
            if key not in ("step", "master_param"):
                assert value.dtype == torch.float32, key


def test_many_tensors_and_one_tensor():
    for sizes in ([(1024,)] * 1000, [(4099,)]):
        a, b, _, _ = run_pair(torch.optim.AdamW, FusedAdamW, dict(lr=1e-2, weight_decay=0.1), sizes=sizes, steps=3)
        assert_close_lists(a, b, torch.float32)


def test_thread_count_does_not_change_results():
    results = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            _, b, _, _ = run_pair(torch.optim.AdamW, FusedAdamW, dict(lr=1e-2), sizes=[(300001,), (70000,)],
                                  steps=3, ours_kw=dict(max_grad_norm=0.5))
        finally:
            torch.set_num_threads(old)
        results.append([t.detach().clone() for t in b])
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("simd", ["scalar", "avx2"])
def test_every_instruction_set_gives_the_same_bits(simd, tmp_path):
    """Each ISA build is selected with TRAINPATTERNS_SIMD in a subprocess; results are bitwise equal
    to the default build's (no FMA contraction, IEEE sqrt and division)."""
    import subprocess
    import sys

    script = (
        "import torch, trainpatterns as tp\n"
        "torch.manual_seed(0)\n"
        "ps=[torch.nn.Parameter(torch.randn(n)) for n in (278011, 33, 0)]\n"
        "o=tp.FusedAdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, max_grad_norm=1.0)\n"
        "for _ in range(5):\n"
        "    for p in ps: p.grad=torch.randn_like(p)\n"
        "    o.step()\n"
        "torch.save([p.detach() for p in ps], r'%s')\n"
        "print(tp.build_info()['simd'])\n"
    )
    outs = {}
    for level in (simd, "avx512"):
        path = tmp_path / f"{level}.pt"
        env = dict(__import__("os").environ, TRAINPATTERNS_SIMD=level)
        res = subprocess.run([sys.executable, "-c", script % path], env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        outs[level] = (res.stdout.strip(), torch.load(path))
    assert outs[simd][0] == simd
    for x, y in zip(outs[simd][1], outs["avx512"][1]):
        assert torch.equal(x, y)


def test_grad_none_is_skipped_like_torch():
    init = make_params([(33,), (7,), (5,)])
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    ref, ours = torch.optim.AdamW(a, lr=1e-2, foreach=False), FusedAdamW(b, lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    for step in range(12):
        for i, (x, y) in enumerate(zip(a, b)):
            if (step + i) % 3 == 0:  # the active set changes from step to step
                x.grad = y.grad = None
            else:
                g = torch.randn(x.shape, generator=gen)
                x.grad, y.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert_close_lists(a, b, torch.float32)
    for x, y in zip(a, b):
        assert float(ours.state[y]["step"]) == float(ref.state[x]["step"])


def test_new_grad_tensors_every_step_and_zero_grad():
    """The real loop: backward allocates fresh gradients after zero_grad(set_to_none=True)."""
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 3))
    model_b = copy.deepcopy(model_a)
    ref = torch.optim.AdamW(model_a.parameters(), lr=1e-2, foreach=False)
    ours = FusedAdamW(model_b.parameters(), lr=1e-2)
    x, y = torch.randn(64, 13), torch.randn(64, 3)
    for step in range(25):
        for model, opt in ((model_a, ref), (model_b, ours)):
            opt.zero_grad(set_to_none=step % 2 == 0)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert_close_lists(list(model_a.parameters()), list(model_b.parameters()), torch.float32)


def test_old_gradients_are_not_kept_alive():
    """After zero_grad(set_to_none=True) the previous gradients must be freed, as with torch's
    optimizers: a cache holding them would cost one gradient buffer of peak memory."""
    import weakref

    p = torch.nn.Parameter(torch.randn(37))
    opt = FusedAdamW([p], lr=1e-2)
    p.grad = torch.randn(37)
    opt.step()
    ref = weakref.ref(p.grad)
    opt.zero_grad(set_to_none=True)
    assert ref() is None
    p.grad = torch.randn(37)  # and the next step still uses the new gradient correctly
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(before, p.detach())


def test_new_grads_with_other_dtype_are_rejected_by_name():
    """torch lets a gradient differ in dtype once grad_dtype is changed; the bulk check of fresh
    gradients must still catch it and name the parameter."""
    p = torch.nn.Parameter(torch.randn(5))
    opt = FusedAdamW([p])
    p.grad = torch.randn(5)
    opt.step()
    p.grad_dtype = None  # allow any gradient dtype
    p.grad = torch.randn(5, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\].*gradient dtype"):
        opt.step()


def test_param_storage_swap_is_detected():
    p = torch.nn.Parameter(torch.ones(10))
    opt = FusedSGD([p], lr=0.5)
    p.grad = torch.ones(10)
    opt.step()
    p.data = torch.zeros(10)  # new storage behind the optimizer's back
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((10,), -0.5))


def test_lr_scheduler_and_param_groups():
    init = make_params([(101,), (7, 3)])
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    ref = torch.optim.AdamW([{"params": [a[0]]}, {"params": [a[1]], "lr": 3e-2, "weight_decay": 0.0}],
                            lr=1e-2, foreach=False)
    ours = FusedAdamW([{"params": [b[0]]}, {"params": [b[1]], "lr": 3e-2, "weight_decay": 0.0}], lr=1e-2)
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]
    s_ref = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=[0.05, 0.1], total_steps=30)
    s_ours = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=[0.05, 0.1], total_steps=30)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen)
            x.grad, y.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
        s_ref.step()
        s_ours.step()
    assert_close_lists(a, b, torch.float32)


def test_add_param_group_later():
    a0, b0 = make_params([(50,), (9,)])
    p = [torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())]
    q = [torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())]
    ref, ours = torch.optim.SGD([p[0]], lr=0.1, momentum=0.9, foreach=False), FusedSGD([q[0]], lr=0.1, momentum=0.9)
    for step in range(6):
        if step == 3:
            ref.add_param_group({"params": [p[1]], "lr": 0.01})
            ours.add_param_group({"params": [q[1]], "lr": 0.01})
        for x, y in zip(p, q):
            x.grad = torch.full_like(x, 0.5 + step)
            y.grad = torch.full_like(y, 0.5 + step)
        ref.step()
        ours.step()
    assert_close_lists(p, q, torch.float32)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
@pytest.mark.parametrize("pair", [
    (torch.optim.AdamW, FusedAdamW, dict(lr=1e-2, amsgrad=True)),
    (torch.optim.SGD, FusedSGD, dict(lr=1e-2, momentum=0.9)),
    (torch.optim.Adagrad, FusedAdagrad, dict(lr=1e-2, lr_decay=0.01)),
], ids=lambda c: c[1].__name__ if isinstance(c, tuple) else c)
def test_state_dict_round_trip(direction, pair):
    """Train 10 steps with one implementation, move the state dict to the other, train 10 more:
    the trajectory equals 20 uninterrupted steps of the reference."""
    torch_cls, ours_cls, kw = pair
    init = make_params([(257,), (4, 9)])
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref = torch_cls(ref_params, **kw, foreach=False)
    first_cls, second_cls = (torch_cls, ours_cls) if direction == "torch_to_ours" else (ours_cls, torch_cls)
    extra = lambda cls: {"foreach": False} if cls is torch_cls else {}  # noqa: E731
    p1 = [torch.nn.Parameter(t.clone()) for t in init]
    opt1 = first_cls(p1, **kw, **extra(first_cls))
    gen = torch.Generator().manual_seed(9)
    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(20)]
    for step in range(20):
        for x, g in zip(ref_params, grads[step]):
            x.grad = g.clone()
        ref.step()
    for step in range(10):
        for x, g in zip(p1, grads[step]):
            x.grad = g.clone()
        opt1.step()
    sd = copy.deepcopy(opt1.state_dict())
    p2 = [torch.nn.Parameter(t.detach().clone()) for t in p1]
    opt2 = second_cls(p2, **kw, **extra(second_cls))
    opt2.load_state_dict(sd)
    for step in range(10, 20):
        for x, g in zip(p2, grads[step]):
            x.grad = g.clone()
        opt2.step()
    assert_close_lists(ref_params, p2, torch.float32)


def test_state_dict_is_torch_layout_and_save_load():
    p = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    opt = FusedAdamW(p, lr=1e-2)
    for x in p:
        x.grad = torch.randn_like(x)
    opt.step()
    sd = opt.state_dict()
    ref = torch.optim.AdamW([torch.nn.Parameter(x.detach().clone()) for x in p], lr=1e-2)
    for x in ref.param_groups[0]["params"]:
        x.grad = torch.randn_like(x)
    ref.step()
    ref_sd = ref.state_dict()
    assert sd["state"].keys() == ref_sd["state"].keys()
    assert sd["state"][0].keys() == ref_sd["state"][0].keys()
    assert sd["param_groups"][0]["params"] == ref_sd["param_groups"][0]["params"]


class TestGradScaler:
    def _models(self):
        torch.manual_seed(0)
        a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        return a, copy.deepcopy(a)

    def test_scaler_matches_torch_and_skips_inf(self):
        model_a, model_b = self._models()
        ref = torch.optim.AdamW(model_a.parameters(), lr=1e-2, foreach=False)
        ours = FusedAdamW(model_b.parameters(), lr=1e-2)
        sc_a = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        sc_b = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        calls = []
        orig = torch.amp.GradScaler._unscale_grads_

        def spy(self, *args, **kwargs):  # torch's own unscaling pass must not run for ours
            calls.append(args[0])
            return orig(self, *args, **kwargs)

        torch.amp.GradScaler._unscale_grads_ = spy
        try:
            for step in range(12):
                for model, opt, sc in ((model_a, ref, sc_a), (model_b, ours, sc_b)):
                    opt.zero_grad()
                    sc.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
                    if step in (4, 7):  # injected overflow: the step must be skipped
                        next(model.parameters()).grad[0, 0] = float("inf" if step == 4 else "nan")
                    before = [p.detach().clone() for p in model.parameters()]
                    sc.step(opt)
                    sc.update()
                    if step in (4, 7):
                        assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
                assert sc_a.get_scale() == sc_b.get_scale()
        finally:
            torch.amp.GradScaler._unscale_grads_ = orig
        assert all(opt is ref for opt in calls), "GradScaler fell back to its own unscale pass for ours"
        assert_close_lists(list(model_a.parameters()), list(model_b.parameters()), torch.float32)
        p0 = next(model_b.parameters())
        assert float(ours.state[p0]["step"]) == 10.0  # two skipped steps did not count

    def test_scaler_with_explicit_unscale_and_clipping(self):
        model_a, model_b = self._models()
        ref = torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9, foreach=False)
        ours = FusedSGD(model_b.parameters(), lr=0.1, momentum=0.9)
        sc_a, sc_b = torch.amp.GradScaler("cpu", init_scale=256.0), torch.amp.GradScaler("cpu", init_scale=256.0)
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        for _ in range(8):
            for model, opt, sc in ((model_a, ref, sc_a), (model_b, ours, sc_b)):
                opt.zero_grad()
                sc.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
                sc.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                sc.step(opt)
                sc.update()
        assert_close_lists(list(model_a.parameters()), list(model_b.parameters()), torch.float32)

    def test_scaler_and_max_grad_norm_in_one_pass(self):
        model_a, model_b = self._models()
        ref = torch.optim.AdamW(model_a.parameters(), lr=1e-2, foreach=False)
        ours = FusedAdamW(model_b.parameters(), lr=1e-2, max_grad_norm=0.05)
        sc_a, sc_b = torch.amp.GradScaler("cpu", init_scale=512.0), torch.amp.GradScaler("cpu", init_scale=512.0)
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        for _ in range(10):
            ref.zero_grad()
            sc_a.scale(torch.nn.functional.mse_loss(model_a(x), y)).backward()
            sc_a.unscale_(ref)
            norm = torch.nn.utils.clip_grad_norm_(model_a.parameters(), 0.05)
            sc_a.step(ref)
            sc_a.update()
            ours.zero_grad()
            sc_b.scale(torch.nn.functional.mse_loss(model_b(x), y)).backward()
            sc_b.step(ours)
            sc_b.update()
            torch.testing.assert_close(ours.last_grad_norm, norm, rtol=1e-5, atol=1e-7)
        assert_close_lists(list(model_a.parameters()), list(model_b.parameters()), torch.float32)


@pytest.mark.parametrize("ours_cls,ref_cls,kw", [
    (FusedAdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (FusedSGD, torch.optim.SGD, dict(lr=1e-1, momentum=0.5)),
    (FusedAdagrad, torch.optim.Adagrad, dict(lr=1e-1)),
])
@pytest.mark.parametrize("max_norm", [0.01, 1e6])
def test_max_grad_norm_matches_clip_grad_norm(ours_cls, ref_cls, kw, max_norm):
    init = make_params([(1001,), (3, 7), (0,)])
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    ref, ours = ref_cls(a, **kw, foreach=False), ours_cls(b, **kw, max_grad_norm=max_norm)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen) * 3
            x.grad, y.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(a, max_norm)
        ref.step()
        ours.step()
        torch.testing.assert_close(ours.last_grad_norm, norm, rtol=1e-5, atol=1e-6)
    assert_close_lists(a, b, torch.float32)


def test_no_norm_without_clipping():
    p = torch.nn.Parameter(torch.randn(4))
    opt = FusedAdamW([p])
    p.grad = torch.randn(4)
    opt.step()
    assert opt.last_grad_norm is None


class TestBadInput:
    def test_sparse_gradient(self):
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt = FusedAdamW(emb.parameters())
        emb(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(RuntimeError, match="sparse gradients"):
            opt.step()

    def test_group_on_two_devices(self):
        a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))
        with pytest.raises(ValueError, match=r"on meta but earlier parameters .* on cpu"):
            FusedSGD([a, b])

    def test_unsupported_dtype(self):
        with pytest.raises(TypeError, match="dtype torch.complex64 is not supported"):
            FusedAdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])

    def test_non_contiguous_parameter(self):
        base = torch.randn(4, 6)
        p = torch.nn.Parameter(base.t())  # a transposed view: not contiguous
        with pytest.raises(ValueError, match="not contiguous"):
            FusedAdamW([p])

    def test_named_parameters_give_names_in_errors(self):
        model = torch.nn.Linear(3, 2)
        opt = FusedAdamW(model.named_parameters())
        model.weight.grad = torch.randn(2, 3)
        model.weight.grad.data = torch.randn(3, 2).t()  # same shape, strided storage
        with pytest.raises(ValueError, match="'weight': gradient storage is not contiguous"):
            opt.step()

    def test_mismatched_grad_dtype_and_shape(self):
        p = torch.nn.Parameter(torch.randn(6))
        opt = FusedAdamW([p])
        p.grad = torch.randn(6)
        p.grad.data = torch.randn(6, dtype=torch.float64)  # torch allows this through .data
        with pytest.raises(TypeError, match=r"gradient dtype torch.float64 does not match"):
            opt.step()
        p.grad = torch.randn(6)
        p.grad.data = torch.randn(2, 3)
        with pytest.raises(ValueError, match=r"gradient shape \(2, 3\) does not match parameter shape \(6,\)"):
            opt.step()

    def test_mismatch_detected_after_caching(self):
        p = torch.nn.Parameter(torch.randn(6))
        opt = FusedAdamW([p])
        p.grad = torch.randn(6)
        opt.step()  # tables cached
        p.grad.data = torch.randn(7)
        with pytest.raises(ValueError, match="gradient shape"):
            opt.step()

    @pytest.mark.parametrize("kw,match", [
        (dict(lr=-1.0), "Invalid learning rate"), (dict(eps=-1.0), "Invalid epsilon"),
        (dict(betas=(1.0, 0.9)), "beta parameter at index 0"), (dict(weight_decay=-1.0), "weight_decay"),
        (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(max_grad_norm=math.inf), "max_grad_norm"),
    ])
    def test_bad_hyperparameters(self, kw, match):
        with pytest.raises(ValueError, match=match):
            FusedAdamW([torch.nn.Parameter(torch.randn(2))], **kw)

    def test_nesterov_needs_momentum(self):
        with pytest.raises(ValueError, match="Nesterov"):
            FusedSGD([torch.nn.Parameter(torch.randn(2))], nesterov=True)

    def test_loading_state_of_another_model(self):
        a = FusedAdamW([torch.nn.Parameter(torch.randn(4))])
        a.param_groups[0]["params"][0].grad = torch.randn(4)
        a.step()
        b = FusedAdamW([torch.nn.Parameter(torch.randn(5))])
        b.load_state_dict(a.state_dict())
        b.param_groups[0]["params"][0].grad = torch.randn(5)
        with pytest.raises(ValueError, match=r"state\['exp_avg'\] has shape \(4,\)"):
            b.step()


def test_closure_and_public_api():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    opt = tp.FusedSGD([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(4.0)
    torch.testing.assert_close(p.detach(), torch.tensor([1.6]))
    assert set(tp.__all__) >= {"FusedAdamW", "FusedAdam", "FusedSGD", "FusedAdagrad", "build_info"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_torch(case, dtype):
    if not tp.build_info()["cuda"]:
        pytest.skip("built without CUDA kernels")
    ref_cls, ours_cls, kw = case
    init = make_params(ODD_SIZES, dtype)
    a = [torch.nn.Parameter(t.clone().cuda()) for t in init]
    b = [torch.nn.Parameter(t.clone().cuda()) for t in init]
    ref = ref_cls(a, **kw, **({"foreach": False} if dtype == torch.float32 else {"fused": True}))
    ours = ours_cls(b, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).to(dtype).cuda()
            x.grad, y.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert_close_lists([x.cpu() for x in a], [y.cpu() for y in b], dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scaler_clip_and_graph_capture():
    if not tp.build_info()["cuda"]:
        pytest.skip("built without CUDA kernels")
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).cuda()
    model_b = copy.deepcopy(model_a)
    ref = torch.optim.AdamW(model_a.parameters(), lr=1e-2, foreach=False)
    ours = FusedAdamW(model_b.parameters(), lr=1e-2, max_grad_norm=0.05)
    sc_a, sc_b = torch.amp.GradScaler("cuda", init_scale=512.0), torch.amp.GradScaler("cuda", init_scale=512.0)
    x, y = torch.randn(32, 8, device="cuda"), torch.randn(32, 1, device="cuda")
    for step in range(10):
        ref.zero_grad()
        sc_a.scale(torch.nn.functional.mse_loss(model_a(x), y)).backward()
        if step == 3:
            next(model_a.parameters()).grad[0, 0] = float("inf")
        sc_a.unscale_(ref)
        torch.nn.utils.clip_grad_norm_(model_a.parameters(), 0.05)
        sc_a.step(ref)
        sc_a.update()
        ours.zero_grad()
        sc_b.scale(torch.nn.functional.mse_loss(model_b(x), y)).backward()
        if step == 3:
            next(model_b.parameters()).grad[0, 0] = float("inf")
        sc_b.step(ours)
        sc_b.update()
    assert_close_lists([p.cpu() for p in model_a.parameters()], [p.cpu() for p in model_b.parameters()],
                       torch.float32)
    # Graph capture: the step launches no sync and no allocation once the tables exist.
    p = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    p.grad = torch.randn(1000, device="cuda")
    opt = FusedAdamW([p], lr=torch.tensor(1e-2, device="cuda"))
    opt.step()
    ref_p = p.detach().clone()
    ref_opt_state = {k: v.clone() for k, v in opt.state[p].items()}
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    check = torch.optim.AdamW([torch.nn.Parameter(ref_p)], lr=1e-2, foreach=False)
    check.param_groups[0]["params"][0].grad = p.grad.clone()
    st = check.state[check.param_groups[0]["params"][0]]
    st.update({"step": ref_opt_state["step"].cpu(), "exp_avg": ref_opt_state["exp_avg"],
               "exp_avg_sq": ref_opt_state["exp_avg_sq"]})
    check.step()
    torch.testing.assert_close(p.detach(), check.param_groups[0]["params"][0].detach(), atol=1e-6, rtol=1e-5)
