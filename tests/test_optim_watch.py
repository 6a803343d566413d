"""The native per-step check behind the fused optimizers' plan cache (csrc/common/tensor_watch.h)
and the tensor reader under it.

Each answer of ``TensorWatch.refresh`` is checked against what plainly happened to the tensors, and
so is what it wrote into the tables' gradient row (compared with each gradient's ``data_ptr()``),
with every way the native side can read tensors: torch's C functions with the lazy-view bits read
from the dispatch key set, the same with ``Tensor.is_neg`` for those bits, and the Python fallback.
"""
from __future__ import annotations

import weakref

import pytest
import torch

import trainpatterns as tp
from trainpatterns import _kernels as k
from trainpatterns._kernels._native import N_ROWS, ROW_GRAD
from trainpatterns.optim import FusedAdamW

READERS = ["torch C functions + key set", "torch C functions + is_neg", "Python fallback"]


@pytest.fixture(params=READERS)
def reader(request):
    """Run a test with each way the native side reads tensors."""
    native = request.param != "Python fallback"
    key_bits = request.param == "torch C functions + key set"
    if k.set_tensor_reader(native, key_bits=key_bits) != native:
        k.set_tensor_reader(True)
        pytest.skip("this torch exports no usable C tensor functions")
    if key_bits and tp.build_info()["lazy_view_reader"] != "dispatch key set":
        k.set_tensor_reader(True)
        pytest.skip("this torch does not report dispatch key sets")
    try:
        yield request.param
    finally:
        k.set_tensor_reader(True)


def test_this_torch_gives_the_fast_readers():
    """The native reader and the key-set bits are what keep a step with new gradient tensors as
    cheap as one with the same tensors: without them each gradient costs a Python call."""
    assert k.set_tensor_reader(True)
    info = tp.build_info()
    assert info["tensor_reader"] == "torch C functions"
    assert info["lazy_view_reader"] == "dispatch key set"


def host_rows(*tables: list) -> list:
    """One int64 [N_ROWS, n] table per list of gradients, holding their addresses in the gradient
    row, as make_table lays it out."""
    out = []
    for grads in tables:
        rows = torch.zeros(N_ROWS, len(grads), dtype=torch.int64)
        rows[ROW_GRAD] = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
        out.append(rows)
    return out


class Watched:
    """Three parameters, gradients on positions 2 and 0 (table order need not be position order),
    in two tables of one entry each."""

    def __init__(self) -> None:
        self.params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 1, 9)]
        self.params[0].grad, self.params[2].grad = torch.randn(5), torch.randn(9)
        grads = [self.params[2].grad, self.params[0].grad]
        self.rows = host_rows(grads[:1], grads[1:])
        self.watch = k.tensor_watch(self.params, [2, 0], grads, self.rows)

    def refresh(self, grads=None) -> int:
        return self.watch.refresh(self.params, grads)

    def table(self) -> list:
        """The gradient addresses the tables hold, in table order."""
        return [int(r[ROW_GRAD, 0]) for r in self.rows]

    def live(self) -> list:
        """The addresses of the current gradients, in table order."""
        return [self.params[2].grad.data_ptr(), self.params[0].grad.data_ptr()]


@pytest.mark.usefixtures("reader")
class TestRefresh:
    def test_unchanged_then_new_gradients_are_written(self):
        w = Watched()
        assert w.refresh() == k.WATCH_UNCHANGED and w.table() == w.live()
        before = w.table()
        w.params[0].grad = torch.randn(5)  # what zero_grad(set_to_none=True) + backward give
        assert w.refresh() == k.WATCH_NEW_GRADS
        assert w.table() == w.live() and w.table()[0] == before[0] and w.table()[1] != before[1]
        assert w.refresh() == k.WATCH_UNCHANGED

    def test_new_objects_at_the_same_addresses_need_nothing(self):
        w = Watched()
        before = w.table()
        w.params[0].grad = w.params[0].grad.detach()  # another tensor object, the same memory
        w.params[2].grad = w.params[2].grad.view(9)
        assert w.refresh() == k.WATCH_UNCHANGED and w.table() == before == w.live()

    def test_moved_gradient_storage_is_written(self):
        w = Watched()
        w.params[2].grad.data = torch.randn(9)  # same object, new storage
        assert w.refresh() == k.WATCH_NEW_GRADS and w.table() == w.live()

    @pytest.mark.parametrize("change", [
        lambda p: setattr(p, "data", p.data[:3]),                     # shrunk in place: same address
        lambda p: p.untyped_storage().resize_(0),                     # storage freed under it
        lambda p: p.untyped_storage().resize_(8),                     # storage smaller than the tensor
        lambda p: setattr(p, "data", torch.randn(5)),                 # storage swapped
    ], ids=["shrunk", "storage-freed", "storage-shrunk", "swapped"])
    def test_parameter_changed_in_place_rebuilds(self, change):
        w = Watched()
        before = w.table()
        with torch.no_grad():
            change(w.params[0])
        assert w.refresh() == k.WATCH_CHANGED and w.table() == before

    @pytest.mark.parametrize("change", [
        lambda p: p.data.t(),                     # same address and size, no longer contiguous
        lambda p: p.data.view(torch.bfloat16),    # same address, size and element size, other dtype
    ], ids=["transposed", "dtype"])
    def test_parameter_reinterpreted_in_place_rebuilds(self, change):
        p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float16))
        p.grad = torch.randn(4, 4, dtype=torch.float16)
        watch = k.tensor_watch([p], [0], [p.grad], host_rows([p.grad]))
        p.data = change(p)
        assert watch.refresh([p]) == k.WATCH_CHANGED

    @pytest.mark.parametrize("change", [
        lambda g: setattr(g, "data", g.data[:4]),                     # same object, same address, fewer elements
        lambda g: g.untyped_storage().resize_(0),
        lambda g: g.untyped_storage().resize_(12),
        lambda g: setattr(g, "data", torch._neg_view(g.data)),       # same object and address, now lazy
    ], ids=["shrunk", "storage-freed", "storage-shrunk", "negated-in-place"])
    def test_gradient_changed_in_place_is_not_written(self, change):
        w = Watched()
        before = w.table()
        change(w.params[2].grad)
        assert w.refresh() == k.WATCH_CHANGED and w.table() == before

    @pytest.mark.parametrize("grad", [
        lambda: torch._neg_view(torch.randn(9)),                      # lazy view: memory holds -values
        lambda: torch.randn(18)[::2],                                 # not contiguous
        lambda: torch.randn(9, dtype=torch.float64),                  # other dtype (grad_dtype relaxed)
        lambda: torch.randn(12)[3:],                                  # view with an offset: fits, is written
    ], ids=["neg-view", "strided", "float64", "offset-view"])
    def test_new_gradient_is_written_only_if_it_fits(self, grad):
        w = Watched()
        before = w.table()
        w.params[2].grad_dtype = None
        w.params[2].grad = grad()
        fits = w.params[2].grad.is_contiguous() and not w.params[2].grad.is_neg() and \
            w.params[2].grad.dtype == torch.float32
        assert w.refresh() == (k.WATCH_NEW_GRADS if fits else k.WATCH_CHANGED)
        assert w.table() == (w.live() if fits else before)

    def test_changes_that_rebuild(self):
        w = Watched()
        w.params[1].grad = torch.randn(1)  # another set of parameters with a gradient
        assert w.refresh() == k.WATCH_CHANGED
        w.params[1].grad = None
        assert w.refresh() == k.WATCH_UNCHANGED
        w.params[0].grad = None
        assert w.refresh() == k.WATCH_CHANGED
        assert w.watch.refresh(w.params[:2]) == k.WATCH_CHANGED  # another list length

    def test_another_parameter_object_at_the_same_address_rebuilds(self):
        w = Watched()
        other = list(w.params)
        other[0] = w.params[0].detach()  # a different tensor over the same memory
        assert w.watch.refresh(other, [w.params[0].grad, None, w.params[2].grad]) == k.WATCH_CHANGED

    def test_explicit_gradient_list(self):
        w = Watched()
        assert w.refresh([w.params[0].grad, None, w.params[2].grad]) == k.WATCH_UNCHANGED
        assert w.refresh([None, None, w.params[2].grad]) == k.WATCH_CHANGED
        new = torch.randn(5)
        assert w.refresh([new, None, w.params[2].grad]) == k.WATCH_NEW_GRADS
        assert w.table() == [w.params[2].grad.data_ptr(), new.data_ptr()]
        with pytest.raises(ValueError, match="one entry per parameter"):
            w.refresh([None])

    def test_gradients_are_not_held(self):
        w = Watched()
        ref = weakref.ref(w.params[0].grad)
        w.params[0].grad = None
        assert ref() is None
        assert w.refresh() == k.WATCH_CHANGED
        w.params[0].grad = torch.randn(5)
        assert w.refresh() == k.WATCH_NEW_GRADS
        ref = weakref.ref(w.params[0].grad)
        w.params[0].grad = None  # freed at once, even right after a refresh that wrote it
        assert ref() is None

    def test_construction_checks_the_tables(self):
        p = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
        for q in p:
            q.grad = torch.randn(3)
        grads = [q.grad for q in p]
        with pytest.raises(ValueError, match="do not hold the given gradients"):
            k.tensor_watch(p, [0, 1], grads, host_rows(grads[::-1]))
        with pytest.raises(ValueError, match="fewer entries"):
            k.tensor_watch(p, [0, 1], grads, host_rows(grads[:1]))
        with pytest.raises(ValueError, match="more entries"):
            k.tensor_watch(p, [0, 1], grads, host_rows(grads, grads[:1]))
        with pytest.raises(ValueError, match="int64"):
            k.tensor_watch(p, [0, 1], grads, [host_rows(grads)[0].double()])
        with pytest.raises(ValueError, match="int64"):
            k.tensor_watch(p, [0, 1], grads, [host_rows(grads)[0][:, :1]])


def test_readers_agree_with_torch_on_lazy_views(reader):
    """What the reader says of a tensor, lazy-view bit included, is what the tensor says. (Asking
    ``Tensor.is_neg`` misses the conjugate bit, which only complex tensors carry: no table holds
    one.)"""
    base = torch.randn(6)
    tensors = [base, torch._neg_view(base), torch._neg_view(base)[2:], torch.randn(3, dtype=torch.complex64),
               torch.nn.Parameter(torch.randn(2)), torch.randn(4)[::2], torch._neg_view(torch.randn(2, 2)).t()]
    if reader != "torch C functions + is_neg":
        tensors.append(torch.randn(3, dtype=torch.complex64).conj())
    for t in tensors:
        assert k.read_tensor(t) == k.tensor_facts(t)


def test_readers_give_data_ptr_and_torch_trajectory(reader):
    tensors = [torch.randn(7), torch.randn(3, 4)[:, 1:], torch.empty(0), torch.randn(2)[1:]]
    assert k.data_ptrs(tensors) == [t.data_ptr() for t in tensors]
    with pytest.raises((RuntimeError, TypeError)):  # an error, never a crash
        k.data_ptrs([torch.randn(3), "not a tensor"])
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in ((278011,), (17, 3), (1,))]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    ref = torch.optim.AdamW(a, lr=1e-2, foreach=False)
    ours = FusedAdamW(b, lr=1e-2)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in a]
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()  # new gradient objects every step
        if step == 3:
            b[0].data = b[0].detach().clone()  # and one storage swap
        ref.step()
        ours.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y.detach(), x.detach(), atol=1e-6, rtol=1e-5)


class _Redirected(torch.nn.Parameter):
    """A parameter whose class may later say that its gradient is another tensor."""


class _Intercepted(torch.nn.Parameter):
    """A parameter whose attribute lookup itself answers for .grad."""

    def __getattribute__(self, name):
        if name == "grad" and "alt" in object.__getattribute__(self, "__dict__"):
            return object.__getattribute__(self, "__dict__")["alt"]
        return super().__getattribute__(name)


@pytest.mark.parametrize("cls", [_Redirected, _Intercepted])
def test_gradient_is_what_p_grad_says(cls):
    """The watch reads .grad the way Python does, also once the class changed what it means."""
    gen = torch.Generator().manual_seed(7)
    init = torch.randn(6, generator=gen)
    a, b = torch.nn.Parameter(init.clone()), cls(init.clone())
    ref, ours = torch.optim.AdamW([a], lr=1e-2, foreach=False), FusedAdamW([b], lr=1e-2)
    try:
        for step in range(4):
            g = torch.randn(6, generator=gen)
            a.grad = g
            if step < 2:
                b.grad = g.clone()
            else:  # from now on .grad is another tensor than the one autograd would set
                if cls is _Redirected:
                    _Redirected.grad = property(lambda self: self.__dict__["alt"])
                b.__dict__["alt"] = g.clone()
            assert torch.equal(b.grad, g)
            ref.step()
            ours.step()
    finally:
        if "grad" in vars(_Redirected):
            del _Redirected.grad
    torch.testing.assert_close(b.detach(), a.detach(), atol=1e-6, rtol=1e-5)
