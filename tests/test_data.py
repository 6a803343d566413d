"""PrefetchLoader and device_prefetch against plain numpy/torch references.

The reference order is written out here independently of the loader: epoch ``e`` visits
``np.random.Generator(np.random.PCG64([seed, e])).permutation(n)`` (``arange(n)`` unshuffled) in
slices of ``batch_size``; a batch is the source indexed by that slice (numpy fancy indexing, or
torch indexing for bfloat16). Comparisons are exact (the loader copies bytes). CUDA tests skip
without a GPU.
"""
from __future__ import annotations

import _thread
import gc
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

import trainpatterns as tp
from trainpatterns import PrefetchLoader, _kernels, device_prefetch

CUDA = torch.cuda.is_available()


def ref_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


def ref_batches(n, batch_size, seed, epochs, shuffle=True, drop_last=False, start_epoch=0):
    """Index arrays of every batch of epochs start_epoch .. start_epoch + epochs - 1."""
    out = []
    for e in range(start_epoch, start_epoch + epochs):
        order = ref_order(n, seed, e, shuffle)
        stop = (n // batch_size) * batch_size if drop_last else n
        out += [order[i:i + batch_size] for i in range(0, stop, batch_size)]
    return out


def n_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def threads_after_stop(expected: int, timeout: float = 2.0) -> int:
    """Thread count once it is down to ``expected`` (or after ``timeout`` s). Native threads are
    gone when close() returns (pthread_join); the order-drawing Python thread is joined too, but
    its OS thread may exit a moment after Thread.join() returns. Callers assert ``<= expected``: a
    thread of another test (a helper still ending) may leave the process meanwhile."""
    deadline = time.monotonic() + timeout
    while n_threads() > expected and time.monotonic() < deadline:
        time.sleep(0.005)
    return n_threads()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_data(n=1003, d=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), np.arange(n, dtype=np.int64) * 3 + 1


@pytest.mark.parametrize("n,batch_size", [(1003, 64), (1024, 64), (5, 7), (1, 1), (0, 4), (64, 1)])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_match_reference_and_cover_each_row_once(n, batch_size, shuffle, drop_last):
    x, y = make_data(n)
    loader = PrefetchLoader({"x": x, "y": y}, batch_size, shuffle=shuffle, seed=11, drop_last=drop_last)
    expect = ref_batches(n, batch_size, 11, 1, shuffle, drop_last)
    assert len(loader) == len(expect)
    got = list(loader)
    assert len(got) == len(expect)
    for b, idx in zip(got, expect):
        assert set(b) == {"x", "y"}
        np.testing.assert_array_equal(b["x"].numpy(), x[idx])
        np.testing.assert_array_equal(b["y"].numpy(), y[idx])
    seen = np.concatenate([b["y"].numpy() for b in got]) if got else np.zeros(0, np.int64)
    if not drop_last:
        np.testing.assert_array_equal(np.sort(seen), y)  # every row exactly once
    else:
        assert len(np.unique(seen)) == len(seen) == (n // batch_size) * batch_size


@pytest.mark.parametrize("threads,prefetch", [(1, 1), (4, 2), (3, 7)])
@pytest.mark.parametrize("d", [7, 1031])  # 1031 floats a row: batches are split over the threads
def test_order_independent_of_threads_and_prefetch(threads, prefetch, d):
    x, y = make_data(2000, d=d)
    base = [tuple(t.numpy().copy() for t in b) for b in PrefetchLoader((x, y), 33, shuffle=True, seed=5,
                                                                       num_threads=1, prefetch=1, epochs=3)]
    other = [tuple(t.numpy().copy() for t in b) for b in PrefetchLoader((x, y), 33, shuffle=True, seed=5,
                                                                        num_threads=threads, prefetch=prefetch,
                                                                        epochs=3)]
    assert len(base) == len(other) == 3 * 61
    for (ax, ay), (bx, by), idx in zip(base, other, ref_batches(2000, 33, 5, 3)):
        np.testing.assert_array_equal(ay, by)
        np.testing.assert_array_equal(bx, x[idx])
        np.testing.assert_array_equal(ax, bx)


def test_epochs_and_endless_mode_draw_fresh_permutations():
    x, y = make_data(100)
    loader = PrefetchLoader((x, y), 32, shuffle=True, seed=2, epochs=None)
    expect = ref_batches(100, 32, 2, 5)
    it = iter(loader)
    for idx in expect:  # 5 epochs, crossing 4 boundaries, and it keeps going
        np.testing.assert_array_equal(next(it)[1].numpy(), y[idx])
    assert (loader.epoch, loader.batch) == (5, 0)
    next(it)
    assert (loader.epoch, loader.batch) == (5, 1)
    it.close()
    # epochs=2: two epochs per iteration; a second loop continues with epochs 2 and 3.
    loader2 = PrefetchLoader((x, y), 32, shuffle=True, seed=2, epochs=2)
    first = [b[1].numpy() for b in loader2]
    second = [b[1].numpy() for b in loader2]
    ref = ref_batches(100, 32, 2, 4)
    for got, idx in zip(first + second, ref):
        np.testing.assert_array_equal(got, y[idx])
    assert len(first) == len(second) == 8 and loader2.epoch == 4


def test_set_epoch_len_and_plain_for_loops():
    x, y = make_data(50)
    loader = PrefetchLoader([x, y], 8, shuffle=True, seed=9)
    assert len(loader) == 7 and len(PrefetchLoader([x, y], 8, drop_last=True)) == 6
    for e in range(2):  # each loop is one epoch with its own permutation
        got = [b[1].numpy() for b in loader]
        for g, idx in zip(got, ref_batches(50, 8, 9, 1, start_epoch=e)):
            np.testing.assert_array_equal(g, y[idx])
    loader.set_epoch(7)
    got = [b[1].numpy() for b in loader]
    for g, idx in zip(got, ref_batches(50, 8, 9, 1, start_epoch=7)):
        np.testing.assert_array_equal(g, y[idx])
    assert isinstance(next(iter(loader)), list)


@pytest.mark.parametrize("stop_at", [0, 1, 13, 31, 32, 45])
@pytest.mark.parametrize("epochs", [None, 3])
def test_resume_mid_epoch_equals_uninterrupted(stop_at, epochs):
    x, y = make_data(500)
    kw = dict(shuffle=True, seed=123, prefetch=4, num_threads=2, epochs=epochs)
    full = [b["y"].numpy().copy() for _, b in zip(range(60), PrefetchLoader({"x": x, "y": y}, 16, **kw))]
    loader = PrefetchLoader({"x": x, "y": y}, 16, **kw)
    it = iter(loader)
    for _ in range(stop_at):
        next(it)
    time.sleep(0.05)  # let the threads run ahead: the state must not count prefetched batches
    state = loader.state_dict()
    assert state["epoch"] * len(loader) + state["batch"] == stop_at
    del it
    resumed = PrefetchLoader({"x": x, "y": y}, 16, **{**kw, "seed": 0})  # the seed comes from the state
    resumed.load_state_dict(state)
    rest = [b["y"].numpy().copy() for _, b in zip(range(60 - stop_at), resumed)]
    if epochs is not None:  # a resumed finite iteration runs to the end of its epochs, like the original
        rest += [b["y"].numpy().copy() for _, b in zip(range(60 - stop_at - len(rest)), resumed)]
    assert len(rest) == 60 - stop_at
    for a, b in zip(full[stop_at:], rest):
        np.testing.assert_array_equal(a, b)


def test_held_batches_never_overwritten_and_pool_stays_bounded():
    x, y = make_data(300, d=33)
    loader = PrefetchLoader((x, y), 17, shuffle=True, seed=1, prefetch=2, num_threads=2, epochs=None)
    it = iter(loader)
    held, copies = [], []
    for i in range(6):
        b = next(it)
        if i % 2 == 0:
            held.append((b[0], b[1][2:5]))  # a whole tensor and a view: both pin the buffer
            copies.append((b[0].clone(), b[1][2:5].clone()))
    for _ in range(200):  # > 10 epochs of reuse
        next(it)
    for (hx, hy), (cx, cy) in zip(held, copies):
        assert torch.equal(hx, cx) and torch.equal(hy, cy)
    del held, hx, hy
    gc.collect()
    for _ in range(20):
        next(it)
    assert it._native.num_slots <= loader.prefetch + 2  # free buffers beyond that were given back
    # Holding a whole epoch grows the pool instead of blocking; every batch stays intact.
    loader2 = PrefetchLoader((x, y), 17, shuffle=True, seed=1, prefetch=2)
    everything = list(loader2)
    for b, idx in zip(everything, ref_batches(300, 17, 1, 1)):
        np.testing.assert_array_equal(b[0].numpy(), x[idx])
        np.testing.assert_array_equal(b[1].numpy(), y[idx])
    it.close()


def test_batches_outlive_loader():
    x, y = make_data(100)
    loader = PrefetchLoader((x, y), 10, shuffle=True, seed=4)
    it = iter(loader)
    b = next(it)
    ref = b[0].clone()
    del it, loader
    gc.collect()
    assert torch.equal(b[0], ref)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def test_batch_size_larger_than_the_data_allocates_only_the_rows_there_are():
    """batch_size 2**40 over 10 rows of 16 bytes: every batch buffer holds the 10 rows (160 bytes,
    one cache-line-rounded part), not 2**40 rows that no allocator could give."""
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    y = np.arange(10, dtype=np.int64)
    loader = PrefetchLoader((x, y), 1 << 40, shuffle=True, seed=2, epochs=None)
    it = iter(loader)
    for epoch in range(3):
        bx, by = next(it)
        order = np.random.Generator(np.random.PCG64([2, epoch])).permutation(10)
        np.testing.assert_array_equal(bx.numpy(), x[order])
        np.testing.assert_array_equal(by.numpy(), y[order])
    assert it._native.slot_bytes == 192 + 128  # x: 160 bytes -> 192; y: 80 bytes -> 128
    assert len(loader) == 1
    # The buffers are sized for the rows there are, so an epoch listing more rows is refused.
    with _kernels.make_prefetcher([_kernels.loader_source("x", x)], batch_size=64, prefetch=1,
                                  num_threads=1) as p:
        with pytest.raises(ValueError, match="lists 11 rows but the sources have 10"):
            p.push_epoch(np.arange(11, dtype=np.int64) % 10, False, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trailing", [(), (3,), (2, 3, 5), (0,), (1, 1)])
def test_dtypes_and_trailing_shapes(dtype, trailing):
    n = 37
    g = torch.Generator().manual_seed(0)
    t = (torch.randn((n, *trailing), generator=g) * 50).to(dtype)
    sources = {"torch": t}
    if dtype != torch.bfloat16:
        sources["numpy"] = t.numpy().copy()
    loader = PrefetchLoader(sources, 8, shuffle=True, seed=3, num_threads=2)
    got = list(loader)
    for b, idx in zip(got, ref_batches(n, 8, 3, 1)):
        ref = t[torch.from_numpy(idx)]
        for k in sources:
            assert b[k].dtype == dtype and b[k].shape == ref.shape
            assert torch.equal(b[k], ref)
    assert len(got) == 5


def test_memmap_source(tmp_path):
    x, y = make_data(777, d=16)
    path = tmp_path / "x.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    mm.flush()
    del mm
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=x.shape)
    loader = PrefetchLoader((ro, y), 100, shuffle=True, seed=8, drop_last=True)
    for b, idx in zip(loader, ref_batches(777, 100, 8, 1, drop_last=True)):
        np.testing.assert_array_equal(b[0].numpy(), x[idx])
        np.testing.assert_array_equal(b[1].numpy(), y[idx])


def test_structures_and_transform():
    x, y = make_data(40)
    one = list(PrefetchLoader(x, 16))
    assert isinstance(one[0], torch.Tensor) and torch.equal(one[2], torch.from_numpy(x[32:]))
    tup = next(iter(PrefetchLoader((x, y), 16)))
    assert isinstance(tup, tuple) and len(tup) == 2
    lst = next(iter(PrefetchLoader([x, y, x], 16)))
    assert isinstance(lst, list) and len(lst) == 3
    d = next(iter(PrefetchLoader({"b": y, "a": x}, 16)))
    assert list(d) == ["b", "a"]
    tr = PrefetchLoader({"x": x, "y": y}, 16, transform=lambda b: (b["x"] * 2, b["y"] + 1))
    for (bx, by), idx in zip(tr, ref_batches(40, 16, 0, 1, shuffle=False)):
        np.testing.assert_array_equal(bx.numpy(), x[idx] * 2)
        np.testing.assert_array_equal(by.numpy(), y[idx] + 1)


def test_failing_transform_ends_iteration_and_keeps_position():
    x, y = make_data(64)
    calls = []

    def flaky(b):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("boom")
        return b

    loader = PrefetchLoader((x, y), 8, shuffle=True, seed=6, transform=flaky)
    got = []
    with pytest.raises(ValueError, match="boom"):
        for b in loader:
            got.append(b[1].numpy())
    assert (loader.epoch, loader.batch) == (0, 2)
    got += [b[1].numpy() for b in loader]  # resumes at the batch that was not delivered
    for g, idx in zip(got, ref_batches(64, 8, 6, 1)):
        np.testing.assert_array_equal(g, y[idx])
    assert len(got) == 8


@pytest.mark.parametrize("make,match", [
    (lambda x, y: PrefetchLoader((x, y[:-1]), 4), "different lengths"),
    (lambda x, y: PrefetchLoader((x, y), 0), "batch_size must be >= 1"),
    (lambda x, y: PrefetchLoader((x, y), -3), "batch_size must be >= 1"),
    (lambda x, y: PrefetchLoader((x, y), True), "batch_size must be an int"),
    (lambda x, y: PrefetchLoader((x, y), 4, prefetch=0), "prefetch must be >= 1"),
    (lambda x, y: PrefetchLoader((x, y), 4, num_threads=0), "num_threads must be >= 1"),
    (lambda x, y: PrefetchLoader((x, y), 4, epochs=0), "epochs must be >= 1"),
    (lambda x, y: PrefetchLoader((x, y), 4, seed=-1), "seed must be >= 0"),
    (lambda x, y: PrefetchLoader((x.astype(np.complex64), y), 4), "dtype complex64 is not supported"),
    (lambda x, y: PrefetchLoader((torch.zeros(10, 2, dtype=torch.complex64),), 4), "not supported"),
    (lambda x, y: PrefetchLoader((np.array(["a", "b"]),), 4), "not supported"),
    (lambda x, y: PrefetchLoader((x[:, ::2], y), 4), "not contiguous"),
    (lambda x, y: PrefetchLoader((torch.from_numpy(x).t(),), 4), "not contiguous"),
    (lambda x, y: PrefetchLoader((np.float32(3.0),), 4), "expected a numpy array"),
    (lambda x, y: PrefetchLoader((np.zeros((), np.float32),), 4), "0-d"),
    (lambda x, y: PrefetchLoader([x.tolist()], 4), "expected a numpy array"),
    (lambda x, y: PrefetchLoader({}, 4), "sources is empty"),
    (lambda x, y: PrefetchLoader("abc", 4), "sources must be"),
    (lambda x, y: PrefetchLoader((x,), 4, transform=3), "transform must be callable"),
    (lambda x, y: PrefetchLoader((x,), 4, device="meta"), "device must be"),
])
def test_bad_input_raises_clearly(make, match):
    x, y = make_data(20)
    with pytest.raises((ValueError, TypeError)) as info:
        make(x, y)
    assert match in str(info.value)


@pytest.mark.skipif(CUDA, reason="checks the error without a GPU")
def test_cuda_device_without_gpu_raises():
    x, _ = make_data(20)
    with pytest.raises(RuntimeError, match="cuda"):
        PrefetchLoader((x,), 4, device="cuda")


def test_load_state_dict_mismatch_raises():
    x, y = make_data(20)
    state = PrefetchLoader((x, y), 4).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        PrefetchLoader((x, y), 5).load_state_dict(state)
    with pytest.raises(ValueError, match="num_rows"):
        PrefetchLoader((x[:10], y[:10]), 4).load_state_dict(state)
    with pytest.raises(KeyError, match="epoch"):
        PrefetchLoader((x, y), 4).load_state_dict({"seed": 0})
    with pytest.raises(ValueError, match="exceeds"):
        PrefetchLoader((x, y), 4).load_state_dict({**state, "batch": 6})


@pytest.mark.parametrize("d", [3, 4099])  # 4099 floats a row: the failing row is in one chunk of several
def test_error_in_native_thread_reaches_consumer(d):
    x, y = make_data(50, d=d)
    sources = [_kernels.loader_source("x", x), _kernels.loader_source("y", y)]
    with _kernels.make_prefetcher(sources, batch_size=8, prefetch=2, num_threads=3) as p:
        order = np.arange(50, dtype=np.int64)
        order[20] = 50  # out of range: the worker gathering batch 2 fails
        assert p.push_epoch(order, False, 0) == 7
        for seq in range(2):
            got_seq, (bx, by) = _kernels.next_batch(p)
            assert got_seq == seq
            np.testing.assert_array_equal(by.numpy(), y[seq * 8:(seq + 1) * 8])
        with pytest.raises(RuntimeError, match="batch 2 failed: row index 50 is out of range"):
            _kernels.next_batch(p)
        with pytest.raises(RuntimeError, match="batch 2 failed"):  # and it stays failed
            _kernels.next_batch(p)
    assert p.closed


def test_ctrl_c_interrupts_a_blocked_wait():
    # A fixed pool of one buffer that the consumer holds: the next batch can never be gathered, so
    # the wait blocks; SIGINT must still reach Python as KeyboardInterrupt.
    x, _ = make_data(50)
    sources = [_kernels.loader_source("x", x)]
    buf = [[torch.empty(8 * sources[0].row_bytes, dtype=torch.uint8)]]
    p = _kernels.make_prefetcher(sources, batch_size=8, prefetch=2, num_threads=1, external=buf)
    p.push_epoch(np.arange(50, dtype=np.int64), False, 0)
    _, held = _kernels.next_batch(p)
    # A process started in the background by a non-interactive shell inherits SIGINT ignored, and
    # then Python drops interrupt_main(): the test installs Python's handler for its duration.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    t0 = time.monotonic()
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            _kernels.next_batch(p)
        assert time.monotonic() - t0 < 5
        timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    np.testing.assert_array_equal(held[0].numpy(), x[:8])
    p.close()


def test_break_and_close_stop_threads():
    x, y = make_data(5000)
    before = n_threads()
    loader = PrefetchLoader((x, y), 10, num_threads=3, epochs=None)
    for i, _ in enumerate(loader):
        if i == 0:
            assert n_threads() >= before + 3
        if i == 5:
            break
    gc.collect()
    assert threads_after_stop(before) <= before
    it = iter(loader)
    next(it)
    loader.close()
    assert threads_after_stop(before) <= before
    with pytest.raises(StopIteration):
        next(it)
    with PrefetchLoader((x, y), 10, num_threads=2) as ctx:
        next(iter(ctx))
    assert threads_after_stop(before) <= before


def test_no_leak_over_1000_loaders():
    x, y = make_data(2000, d=64)
    before_threads = n_threads()

    def run_one():
        loader = PrefetchLoader({"x": x, "y": y}, 64, shuffle=True, num_threads=2, prefetch=3)
        it = iter(loader)
        next(it)
        next(it)  # threads running, buffers in flight, then everything is dropped

    for _ in range(100):  # warm up allocators before measuring memory
        run_one()
    gc.collect()
    rss0 = rss_bytes()
    for _ in range(1000):
        run_one()
    gc.collect()
    assert threads_after_stop(before_threads) <= before_threads
    assert rss_bytes() - rss0 < 32 * 2**20


def test_device_prefetch_cpu_passthrough():
    ds = torch.utils.data.TensorDataset(torch.arange(30.0).view(10, 3), torch.arange(10))
    dl = torch.utils.data.DataLoader(ds, batch_size=4)
    got = list(device_prefetch(dl, "cpu"))
    ref = list(dl)
    assert len(got) == len(ref) == 3
    for g, r in zip(got, ref):
        assert isinstance(g, list) and all(torch.equal(a, b) for a, b in zip(g, r))
    with pytest.raises(ValueError, match="prefetch must be >= 1"):
        device_prefetch(dl, "cpu", prefetch=0)


def test_device_prefetch_keeps_nested_structure():
    import collections

    Pair = collections.namedtuple("Pair", "a b")
    items = [{"x": torch.full((2, 3), float(i)), "meta": [Pair(torch.tensor([i]), "tag"), 7]} for i in range(4)]
    got = list(device_prefetch(iter(items), torch.device("cpu"), prefetch=3))
    assert len(got) == 4
    for g, r in zip(got, items):
        assert torch.equal(g["x"], r["x"]) and isinstance(g["meta"][0], Pair)
        assert torch.equal(g["meta"][0].a, r["meta"][0].a) and g["meta"][0].b == "tag" and g["meta"][1] == 7


def test_public_api():
    assert tp.PrefetchLoader is PrefetchLoader and tp.device_prefetch is device_prefetch
    assert "PrefetchLoader" in tp.__all__ and "device_prefetch" in tp.__all__


# ---- GPU ----
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_loader_matches_reference_and_held_batches_survive():
    x, y = make_data(1003, d=9)
    loader = PrefetchLoader({"x": x, "y": y}, 64, shuffle=True, seed=3, device="cuda", epochs=None)
    it = iter(loader)
    held = []
    for i, idx in enumerate(ref_batches(1003, 64, 3, 3)):
        b = next(it)
        assert b["x"].is_cuda and b["y"].is_cuda
        np.testing.assert_array_equal(b["x"].cpu().numpy(), x[idx])
        np.testing.assert_array_equal(b["y"].cpu().numpy(), y[idx])
        if i % 7 == 0:
            held.append((b["x"], b["x"].clone()))
    for _ in range(100):
        next(it)
    torch.cuda.synchronize()
    for h, c in held:
        assert torch.equal(h, c)
    assert len(loader._pinned) == loader.prefetch + 3 and all(t.is_pinned() for s in loader._pinned for t in s)
    it.close()


@needs_cuda
def test_cuda_loader_consumer_on_other_stream_and_resume():
    x, y = make_data(500)
    kw = dict(shuffle=True, seed=5, device="cuda", epochs=None)
    full = [b[1].cpu() for _, b in zip(range(40), PrefetchLoader((x, y), 16, **kw))]
    loader = PrefetchLoader((x, y), 16, **kw)
    s = torch.cuda.Stream()
    got = []
    with torch.cuda.stream(s):
        it = iter(loader)
        for _ in range(20):
            got.append((next(it)[1] * 1).cpu())
    state = loader.state_dict()
    it.close()
    resumed = PrefetchLoader((x, y), 16, **kw)
    resumed.load_state_dict(state)
    got += [b[1].cpu() for _, b in zip(range(20), resumed)]
    for a, b in zip(full, got):
        assert torch.equal(a, b)


@needs_cuda
def test_device_prefetch_cuda_matches_dataloader():
    ds = torch.utils.data.TensorDataset(torch.randn(103, 5), torch.arange(103))
    for pin in (False, True):
        dl = torch.utils.data.DataLoader(ds, batch_size=10, pin_memory=pin)
        got = [(a.cpu(), b.cpu()) for a, b in device_prefetch(dl, "cuda")]
        ref = list(dl)
        assert len(got) == len(ref)
        for (ga, gb), (ra, rb) in zip(got, ref):
            assert torch.equal(ga, ra) and torch.equal(gb, rb)


@needs_cuda
def test_cuda_no_thread_or_pinned_leak_over_1000_loaders():
    x, y = make_data(2000, d=64)

    def run_one():
        loader = PrefetchLoader({"x": x, "y": y}, 64, shuffle=True, num_threads=2, device="cuda")
        it = iter(loader)
        next(it)
        next(it)

    for _ in range(50):
        run_one()
    gc.collect()
    torch.cuda.synchronize()
    threads0, rss0 = n_threads(), rss_bytes()
    for _ in range(1000):
        run_one()
    gc.collect()
    torch.cuda.synchronize()
    assert threads_after_stop(threads0) <= threads0
    assert rss_bytes() - rss0 < 64 * 2**20  # pinned buffers are resident: a leak would show here


@pytest.mark.timeout(60)
def test_iterator_used_in_a_forked_child_raises_instead_of_hanging():
    """A forked child inherits the iterator but not its gather threads: next() must say so, and the
    child must exit without hanging on the threads; the parent's iteration is unaffected."""
    import multiprocessing as mp

    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    loader = PrefetchLoader(x, batch_size=4)
    it = iter(loader)
    first = next(it)

    def child(q):
        try:
            next(it)
            msg = "no error"
        except RuntimeError as e:
            msg = str(e)
        it.close()  # must not join the parent's threads
        q.put(msg)

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    msg = q.get(timeout=30)
    p.join(timeout=30)
    assert p.exitcode is not None, "the forked child hung on exit"
    assert "another process" in msg
    rest = [b.clone() for b in it]
    assert torch.equal(torch.cat([first] + rest), torch.from_numpy(x))
