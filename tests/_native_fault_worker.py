"""Child process for tests/test_native_faults.py: runs cases that used to end the process with a
signal (SIGSEGV, SIGBUS) or a wrong answer, so that a crash is seen as one, with the case that
caused it.

Before each case the worker prints ``start <case>`` and after it ``done <json>``; a worker that
dies by a signal leaves its last case unfinished in the output. TP_TENSOR_READER=python makes the
optimizers read tensors through the Python fallback instead of torch's C functions. Modes (argv[1]):
  cases TMPDIR NAME...   the named deterministic cases (CASES below)
  optim SEED N           N random optimizer scenarios drawn by hypothesis (see optim_case)
  loader TMPDIR SEED N   N random loader scenarios drawn by hypothesis (see loader_case)

Oracles are independent of the code under test: torch.optim's for-loop step (on fp32 copies,
rounded after every step, for 16-bit parameters) for the optimizers, numpy fancy indexing of a copy
of the sources made before the loader exists for the loader, and the tensors' own metadata for
what counts as invalid input (non-contiguous, a lazy negated view, a storage that no longer holds
the tensor, a shape or dtype that does not match).
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

torch.set_num_threads(1)

import trainpatterns as tp  # noqa: E402
from trainpatterns.optim import FusedAdagrad, FusedAdam, FusedAdamW, FusedSGD  # noqa: E402
from test_optim import TOL  # noqa: E402  (the tolerances of the optimizer tests)

REFUSED = (ValueError, TypeError, RuntimeError)


def report(tag: str, value) -> None:
    print(tag, json.dumps(value, default=str), flush=True)


def holds(t: torch.Tensor) -> bool:
    """The storage holds the tensor's elements (a contiguous tensor's extent)."""
    return t.numel() == 0 or (t.storage_offset() + t.numel()) * t.element_size() <= t.untyped_storage().nbytes()


def fits(t: torch.Tensor) -> bool:
    """Contiguous, not a lazy negated view, held by its storage (an empty tensor always fits)."""
    return t.numel() == 0 or (t.is_contiguous() and not t.is_neg() and holds(t))


# ---- deterministic cases ----------------------------------------------------------------------

def _stepped(cls=FusedAdamW, n=1 << 20, **kw):
    p = torch.nn.Parameter(torch.randn(n))
    opt = cls([p], **kw)
    p.grad = torch.randn(n)
    opt.step()
    return p, opt


def case_param_shrunk_in_place(_tmp):
    p, opt = _stepped()
    p.data = p.data[:10]  # same address: a cached table would still say 1M elements
    p.grad = torch.randn(10)
    opt.step()


def case_param_storage_resized(_tmp):
    p, opt = _stepped(FusedSGD, lr=0.1)
    p.untyped_storage().resize_(0)
    opt.step()


def case_grad_storage_resized(_tmp):
    p, opt = _stepped(FusedSGD, lr=0.1)
    p.grad.untyped_storage().resize_(16)
    opt.step()


def case_grad_storage_shrunk_persistent(_tmp):
    p, opt = _stepped(FusedAdamW, n=1 << 20)
    g = p.grad
    g.data = g.data[:100]  # same gradient object, same address, fewer elements
    opt.step()


def case_neg_view_gradient(_tmp):
    p = torch.nn.Parameter(torch.zeros(4))
    opt = FusedSGD([p], lr=1.0)
    p.grad = torch._neg_view(torch.ones(4))  # its values are -1; its memory holds +1
    opt.step()
    return p.detach().tolist()  # torch.optim.SGD gives [1, 1, 1, 1]


def case_loader_tensor_resized(_tmp):
    x = torch.arange(1 << 16, dtype=torch.float32).view(-1, 16)
    ref = x.clone()  # not x.numpy(): exporting to numpy would itself pin x's storage
    it = iter(tp.PrefetchLoader((x,), 256, shuffle=True, seed=3, num_threads=2, prefetch=4))
    first = next(it)[0]
    refused = ""
    try:
        x.untyped_storage().resize_(0)  # frees the memory the gather threads read, unless refused
    except RuntimeError as e:
        refused = str(e)
    order = torch.from_numpy(np.random.Generator(np.random.PCG64([3, 0])).permutation(len(ref)))
    batches = [first] + [b[0] for b in it]
    ok = all(torch.equal(b, ref[order[i * 256:(i + 1) * 256]]) for i, b in enumerate(batches))
    return {"refused": refused, "batches_equal_reference": ok}


def case_loader_memmap_truncated(tmp):
    path = os.path.join(tmp, "rows.f32")
    a = np.memmap(path, dtype=np.float32, mode="w+", shape=(1 << 14, 64))
    a[:] = 1.0
    a.flush()
    it = iter(tp.PrefetchLoader((a,), 512, num_threads=2, prefetch=1))
    next(it)
    time.sleep(1.0)  # the threads have gathered one batch ahead and wait: the truncation lands between chunks
    os.truncate(path, 4096)
    for _ in it:
        pass


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def run_cases(tmp: str, names: list) -> None:
    for name in names:
        report("start", name)
        try:
            report("done", {"case": name, "result": CASES[name](tmp)})
        except REFUSED as e:
            report("done", {"case": name, "error": type(e).__name__, "message": str(e)})


# ---- random optimizer scenarios ---------------------------------------------------------------

OPTIMS = {
    "AdamW": (torch.optim.AdamW, FusedAdamW, dict(lr=1e-2, weight_decay=0.1)),
    "Adam-amsgrad": (torch.optim.Adam, FusedAdam, dict(lr=1e-2, amsgrad=True, weight_decay=0.05)),
    "SGD-nesterov": (torch.optim.SGD, FusedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    "SGD": (torch.optim.SGD, FusedSGD, dict(lr=0.1)),
    "Adagrad": (torch.optim.Adagrad, FusedAdagrad, dict(lr=1e-2, lr_decay=0.01)),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ["plain"] * 5 + ["slice"] * 3 + ["transposed", "expanded"]  # mostly parameters that fit
GRADS = ["fresh", "fresh", "persistent", "persistent", "none", "slice"]
MUTATIONS = [None] * 6 + ["swap", "swap_slice", "shrink", "resize_param", "resize_grad", "grad_shrink", "swap_neg",
                          "grad_neg", "grad_strided", "grad_expand", "grad_dtype"]


@st.composite
def optim_case(draw) -> dict:
    shape = st.one_of(st.lists(st.integers(0, 5), min_size=1, max_size=3).map(tuple), st.just((300,)))
    n = draw(st.integers(1, 4))
    return {
        "optim": draw(st.sampled_from(sorted(OPTIMS))),
        "dtype": draw(st.sampled_from(sorted(DTYPES))),
        "params": [{"shape": draw(shape), "layout": draw(st.sampled_from(LAYOUTS))} for _ in range(n)],
        "steps": draw(st.lists(st.fixed_dictionaries({
            "grads": st.lists(st.sampled_from(GRADS), min_size=n, max_size=n),
            "mutation": st.tuples(st.sampled_from(MUTATIONS), st.integers(0, n - 1), st.sampled_from([0.0, 0.5, 1.0])),
        }), min_size=1, max_size=5)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor holding ``values`` laid out as asked: own storage, a slice of a larger storage
    (storage offset), reversed strides, or one value broadcast (stride 0)."""
    if layout == "slice":
        base = torch.zeros(values.numel() + 7, dtype=values.dtype)
        t = base[3:3 + values.numel()].view(values.shape)
        return t.copy_(values)
    if layout == "transposed" and values.dim() >= 2:
        rev = tuple(reversed(range(values.dim())))
        return values.permute(rev).contiguous().permute(rev)
    if layout == "expanded":
        return values.reshape(-1)[:1].clone().reshape((1,) * values.dim()).expand(values.shape) \
            if values.numel() else values.clone()
    return values.clone()


def _mutate(kind: str, p: torch.nn.Parameter, frac: float, dtype: torch.dtype) -> None:
    """Change one parameter or its gradient behind the optimizer's back, keeping the values the
    reference sees. A tensor whose storage was already cut short is left alone: reading it would
    crash torch itself."""
    g = p.grad
    if not holds(p) or (g is not None and not holds(g)):
        return
    if kind == "swap":
        p.data = p.data.clone()
    elif kind == "swap_slice":
        p.data = _with_layout(p.data.clone(), "slice")
    elif kind == "shrink":
        p.data = p.data.reshape(-1)[:max(0, p.numel() - 1)]
    elif kind == "resize_param":
        p.untyped_storage().resize_(int(p.untyped_storage().nbytes() * frac))
    elif kind == "swap_neg":  # the same values, its memory holding their negation
        p.data = torch._neg_view(p.data.neg())
    elif g is None:
        return
    elif kind == "resize_grad":
        g.untyped_storage().resize_(int(g.untyped_storage().nbytes() * frac))
    elif kind == "grad_shrink":
        g.data = g.data.reshape(-1)[:max(0, g.numel() - 1)]
    elif kind == "grad_neg":
        p.grad = torch._neg_view(g.neg())
    elif kind == "grad_strided":
        p.grad = _with_layout(g.clone(), "transposed")
    elif kind == "grad_expand":
        p.grad = _with_layout(g.clone(), "expanded")
    elif kind == "grad_dtype":
        p.grad_dtype = None
        p.grad = g.to(torch.float64 if dtype != torch.float64 else torch.float32)


def run_optim_case(case: dict) -> str:
    """'ok' when every step matched torch.optim, 'refused' when the fused optimizer raised at a step
    it had to refuse (leaving the parameters untouched); AssertionError otherwise.

    A step must be refused when a parameter with a gradient, or its gradient, does not fit (see
    fits), when they differ in element count or dtype, or when the parameter no longer has the
    element count of its optimizer state. It may be refused (torch refuses it) when only shapes
    differ over the same elements, or an empty parameter or gradient is a lazy view."""
    ref_cls, ours_cls, kw = OPTIMS[case["optim"]]
    dtype = DTYPES[case["dtype"]]
    sixteen = dtype in (torch.float16, torch.bfloat16)
    gen = torch.Generator().manual_seed(case["seed"])
    params = [torch.nn.Parameter(_with_layout(torch.randn(s["shape"], generator=gen).to(dtype), s["layout"]))
              for s in case["params"]]
    refs = [torch.nn.Parameter(p.detach().to(torch.float32 if sixteen else dtype).contiguous().clone()) for p in params]
    ref = ref_cls(refs, foreach=False, **kw)
    if not all(fits(p) for p in params):
        try:
            ours_cls(params, **kw)
        except REFUSED:
            return "refused"
        raise AssertionError("a parameter that does not fit was accepted")
    ours = ours_cls(params, **kw)
    # The shape of each parameter's optimizer state, once it has one (Adagrad's exists from the start).
    state = [p.shape if ours_cls is FusedAdagrad else None for p in params]
    stateful = case["optim"] != "SGD"
    persistent = {}
    for step in case["steps"]:
        for i, (p, kind) in enumerate(zip(params, step["grads"])):
            values = torch.randn(p.shape, generator=gen).to(dtype)
            if kind == "none":
                p.grad = refs[i].grad = None
                continue
            if kind == "persistent":  # the same gradient object, refilled in place
                g = persistent.get(i)
                if g is None or g.shape != p.shape or g.dtype != dtype or not fits(g):
                    g = persistent[i] = torch.empty_like(values)
                p.grad = g.copy_(values)
            else:
                p.grad = _with_layout(values, "slice" if kind == "slice" else "plain")
            refs[i].grad = values.to(refs[i].dtype) if values.shape == refs[i].shape else None
        kind, which, frac = step["mutation"]
        if kind is not None:
            _mutate(kind, params[which], frac, dtype)
        active = [i for i, p in enumerate(params) if p.grad is not None]
        must = [i for i in active if not fits(params[i]) or not fits(params[i].grad)
                or params[i].grad.numel() != params[i].numel() or params[i].grad.dtype != dtype
                or (state[i] is not None and params[i].numel() != state[i].numel())]
        may = [i for i in active if params[i].grad.shape != params[i].shape or params[i].shape != refs[i].shape
               or any(t.numel() == 0 and t.is_neg() for t in (params[i], params[i].grad))]
        # Only tensors whose storage holds them are read here: torch would read past the end too.
        before = [p.detach().clone() for p in params if holds(p)]
        try:
            ours.step()
        except REFUSED:
            assert must or may, "a valid step was refused"
            after = [p.detach() for p in params if holds(p)]
            assert all(torch.equal(a, b) for a, b in zip(before, after)), "a refused step changed parameters"
            return "refused"
        assert not must, f"an invalid step was accepted (parameters {must})"
        for i in active:
            if stateful and state[i] is None:
                state[i] = params[i].shape
        ref.step()
        if sixteen:  # store as the 16-bit format would
            with torch.no_grad():
                for r in refs:
                    r.copy_(r.to(dtype).float())
                    for key, value in ref.state[r].items():
                        if key != "step" and torch.is_tensor(value):
                            value.copy_(value.to(dtype).float())
        for p, r in zip(params, refs):
            if p.shape == r.shape and holds(p):  # not one shrunk or cut short while it had no gradient
                torch.testing.assert_close(p.detach(), r.detach().to(dtype), **TOL[dtype])
    return "ok"


# ---- random loader scenarios ------------------------------------------------------------------

LOADER_DTYPES = ["float32", "float64", "float16", "bfloat16", "int64", "int8", "uint8", "bool"]


@st.composite
def loader_case(draw) -> dict:
    n = draw(st.integers(1, 3))
    return {
        "sources": [{"kind": draw(st.sampled_from(["numpy", "torch", "memmap", "numpy_of_torch"])),
                     "dtype": draw(st.sampled_from(LOADER_DTYPES)),
                     "trailing": draw(st.lists(st.integers(0, 4), max_size=2))} for _ in range(n)],
        "rows": draw(st.integers(0, 40)),
        "batch_size": draw(st.one_of(st.integers(1, 50), st.just(1 << 40))),
        "shuffle": draw(st.booleans()), "drop_last": draw(st.booleans()),
        "threads": draw(st.integers(1, 3)), "prefetch": draw(st.integers(1, 3)), "seed": draw(st.integers(0, 99)),
        "event": draw(st.sampled_from([None, None, "swap_tensor", "resize_tensor", "truncate_between_epochs"])),
    }


def _source(spec: dict, rows: int, tmp: str, k: int):
    """(what the loader gets, a copy of its values as a torch tensor)."""
    dtype = getattr(torch, spec["dtype"])
    values = (torch.randn(rows, *spec["trailing"]) * 50).to(dtype)
    if spec["kind"] == "torch" or dtype == torch.bfloat16:  # numpy has no bfloat16
        return values.clone(), values
    arr = values.numpy().copy()
    if spec["kind"] == "memmap" and arr.nbytes > 0:  # numpy cannot map an empty file
        m = np.memmap(os.path.join(tmp, f"src{k}_{time.monotonic_ns()}"), dtype=arr.dtype, mode="w+",
                      shape=arr.shape)
        m[...] = arr
        m.flush()
        return m, values
    if spec["kind"] == "numpy_of_torch":
        return values.clone().numpy(), values
    return arr, values


def run_loader_case(case: dict, tmp: str) -> str:
    rows, bs = case["rows"], case["batch_size"]
    made = [_source(s, rows, tmp, k) for k, s in enumerate(case["sources"])]
    given_, refs = [m[0] for m in made], [m[1] for m in made]
    loader = tp.PrefetchLoader(tuple(given_), bs, shuffle=case["shuffle"], seed=case["seed"],
                               drop_last=case["drop_last"], num_threads=case["threads"], prefetch=case["prefetch"])
    per_epoch = rows // bs if case["drop_last"] else math.ceil(rows / bs)
    outcome = "ok"
    for epoch in range(2):
        order = np.arange(rows) if not case["shuffle"] else \
            np.random.Generator(np.random.PCG64([case["seed"], epoch])).permutation(rows)
        if epoch == 1 and case["event"] == "truncate_between_epochs":
            files = [g for g in given_ if isinstance(g, np.memmap) and g.nbytes > 0]
            for g in files:
                os.truncate(g.filename, 0)
            if files and per_epoch:
                try:
                    next(iter(loader))
                except RuntimeError as e:
                    assert "truncated" in str(e), str(e)
                    return "refused"
                raise AssertionError("a truncated source file was read")
        for b, batch in enumerate(loader):
            if b == 0 and epoch == 0 and case["event"] in ("swap_tensor", "resize_tensor"):
                for g in given_:  # a torch source, or the tensor a numpy source views
                    t = g if isinstance(g, torch.Tensor) else g.base
                    if not isinstance(t, torch.Tensor):
                        continue
                    if case["event"] == "swap_tensor":
                        t.data = torch.zeros_like(t)  # the loader keeps reading the memory it was given
                        continue
                    try:
                        t.untyped_storage().resize_(0)
                    except RuntimeError:
                        outcome = "resize refused"
                    else:
                        raise AssertionError("a source's storage was resized while the loader read it")
            idx = torch.from_numpy(order[b * bs:(b + 1) * bs])
            for got, want in zip(batch, refs):
                assert torch.equal(got, want[idx]), f"epoch {epoch} batch {b} differs"
    return outcome


# ---- entry -------------------------------------------------------------------------------------

def fuzz(strategy, run, seed_value: int, n: int) -> None:
    counts: dict = {}

    @seed(seed_value)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def check(case):
        report("start", case)
        result = run(case)
        counts[result] = counts.get(result, 0) + 1
        report("done", result)

    check()
    report("summary", counts)


if __name__ == "__main__":
    if os.environ.get("TP_TENSOR_READER") == "python":
        tp._kernels.set_tensor_reader(False)
    mode = sys.argv[1]
    if mode == "cases":
        run_cases(sys.argv[2], sys.argv[3:])
    elif mode == "optim":
        fuzz(optim_case(), run_optim_case, int(sys.argv[2]), int(sys.argv[3]))
    elif mode == "loader":
        tmp = sys.argv[2]
        fuzz(loader_case(), lambda c: run_loader_case(c, tmp), int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode}")
