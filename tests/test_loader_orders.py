"""A new epoch's first batch without waiting for its permutation: orders drawn ahead of time in the
background (trainpatterns._loader_order), handed to the threads a chunk of batches at a time, and
the threads kept between the iterations of a ``for epoch: for batch in loader`` loop.

The order must stay exactly the documented one, so every batch is checked element by element
against a reference written out here: epoch ``e`` visits
``np.random.Generator(np.random.PCG64([seed, e])).permutation(n)`` (``arange(n)`` unshuffled); with
``world_size`` w it is wrapped around to ``ceil(n / w) * w`` positions (cut to ``(n // w) * w`` with
drop_last) and rank r takes positions r, r + w, ...; batches are consecutive slices, the short last
one dropped with drop_last. Sources are rows that carry their own index (one of them a memmap), at
least ``BACKGROUND_ROWS`` of them so that orders are drawn on the helper thread. Timing checks use
an order draw slowed down to hundreds of milliseconds, far above any scheduling noise.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainpatterns import PrefetchLoader, _loader_order

BIG = _loader_order.BACKGROUND_ROWS  # orders of this many rows are drawn in the background


def ref_batches(n, batch_size, seed, epoch, rank=0, world=1, shuffle=True, drop_last=False):
    order = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n) if shuffle else np.arange(n)
    total = (n // world) * world if drop_last else -(-n // world) * world
    mine = order[np.arange(rank, total, world) % n].astype(np.int64)
    stop = (len(mine) // batch_size) * batch_size if drop_last else len(mine)
    return [mine[i:i + batch_size] for i in range(0, stop, batch_size)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(x, y) over 70001 rows: x an int32 memmap with x[i] = (i, -i), y int64 with y[i] = 3 i."""
    n = BIG + 4465
    path = tmp_path_factory.mktemp("orders") / "x.i32"
    x = np.memmap(path, dtype=np.int32, mode="w+", shape=(n, 2))
    x[:, 0] = np.arange(n)
    x[:, 1] = -np.arange(n)
    x.flush()
    return np.memmap(path, dtype=np.int32, mode="r", shape=(n, 2)), np.arange(n, dtype=np.int64) * 3


def check(batch, rows):
    x, y = batch
    assert torch.equal(x[:, 0], torch.from_numpy(rows.astype(np.int32)))
    assert torch.equal(x[:, 1], torch.from_numpy(-rows.astype(np.int32)))
    assert torch.equal(y, torch.from_numpy(rows * 3))


@settings(max_examples=25, deadline=None)
@given(batch_size=st.sampled_from([997, 4096, 30000]), world=st.integers(1, 3), seed=st.integers(0, 2**32),
       shuffle=st.booleans(), drop_last=st.booleans(), epochs=st.sampled_from([1, 2, None]),
       start=st.integers(0, 200), draw=st.data())
def test_batches_are_the_documented_ones_from_any_position(data, batch_size, world, seed, shuffle, drop_last,
                                                          epochs, start, draw):
    """Sharded or not, from a fresh loader or resumed mid-epoch, in one or several epochs per
    iteration: every batch is the reference's, through several iterations of the same loader."""
    x, y = data
    n = len(y)
    rank = draw.draw(st.integers(0, world - 1))
    kw = dict(shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world, epochs=epochs)
    loader = PrefetchLoader((x, y), batch_size, num_threads=2, prefetch=3, **kw)
    per_epoch = len(loader)
    if per_epoch == 0:  # drop_last and fewer rows per rank than a batch
        assert list(loader) == []
        return
    epoch, batch = divmod(start, per_epoch)
    loader.load_state_dict(dict(seed=seed, epoch=epoch, batch=batch, world_size=world))
    ref = [b for e in range(epoch, epoch + 8) for b in ref_batches(n, batch_size, seed, e, rank, world, shuffle,
                                                                  drop_last)][batch:]
    got = []
    for _ in range(2):  # two iterations: the second starts where the first stopped
        it = iter(loader)
        for b in it:
            got.append(b)
            if len(got) >= 2 * per_epoch + 3:
                break
        it.close()
    assert len(got) >= min(2 * per_epoch + 3, per_epoch - batch)
    for b, rows in zip(got, ref):
        check(b, rows)
    # The position counts exactly the batches handed out.
    assert loader.epoch * per_epoch + loader.batch == epoch * per_epoch + batch + len(got)
    loader.close()


def test_epoch_loops_breaks_and_resumes_follow_the_reference(data):
    x, y = data
    n, size = len(y), 2048
    loader = PrefetchLoader((x, y), size, shuffle=True, seed=5, num_threads=2)
    for epoch in range(3):  # plain loops: the threads are kept between them
        batches = list(loader)
        assert len(batches) == len(ref_batches(n, size, 5, epoch))
        for b, rows in zip(batches, ref_batches(n, size, 5, epoch)):
            check(b, rows)
    for i, b in enumerate(loader):  # leave epoch 3 early, then go on where it stopped
        if i == 4:
            break
    state = loader.state_dict()
    rest = list(loader)
    for b, rows in zip(rest, ref_batches(n, size, 5, 3)[5:]):
        check(b, rows)
    other = PrefetchLoader((x, y), size, shuffle=True, seed=5)
    other.load_state_dict(state)  # another loader resumes from the saved position
    for b, rows in zip(list(other), ref_batches(n, size, 5, 3)[5:]):
        check(b, rows)
    loader.set_epoch(9)
    for b, rows in zip(list(loader), ref_batches(n, size, 5, 9)):
        check(b, rows)


@pytest.fixture
def slow_draws(monkeypatch):
    """Make drawing the order of the epochs in ``slow`` take ``delay`` seconds longer."""
    slow, real = {"epochs": set(), "delay": 0.6}, _loader_order.epoch_order

    def epoch_order(num_rows, seed, epoch, shuffle):
        if epoch in slow["epochs"]:
            time.sleep(slow["delay"])
        return real(num_rows, seed, epoch, shuffle)

    monkeypatch.setattr(_loader_order, "epoch_order", epoch_order)
    return slow


def assert_first_batch_ready(loader, rows: int, seed: int, epoch: int, what: str) -> None:
    """``iter(loader)`` then ``next()`` gives epoch ``epoch``'s documented first batch of 4096 of
    ``rows`` rows within 0.3 s (a draw there takes ``slow_draws``' delay, longer): its order was
    drawn ahead."""
    t0 = time.perf_counter()
    it = iter(loader)
    b = next(it)
    dt = time.perf_counter() - t0
    check(b, ref_batches(rows, 4096, seed, epoch)[0])
    assert dt < 0.3, f"{what} took {dt:.2f} s: its order was drawn only when it was needed"
    it.close()


def test_the_next_epochs_order_is_drawn_while_this_one_runs(data, slow_draws):
    x, y = data
    slow_draws["epochs"] = {1, 2}
    loader = PrefetchLoader((x, y), 4096, shuffle=True, seed=3)
    for i, b in enumerate(loader):  # an epoch that lasts longer than a draw
        time.sleep(1.0 / len(loader))
    assert_first_batch_ready(loader, len(y), 3, 1, "epoch 1's first batch")


def test_a_fresh_loaders_order_is_drawn_from_its_construction(data, slow_draws):
    x, y = data
    slow_draws["epochs"] = {0}
    loader = PrefetchLoader((x, y), 4096, shuffle=True, seed=4)
    time.sleep(0.9)  # the model is built meanwhile
    assert_first_batch_ready(loader, len(y), 4, 0, "the first batch")


def test_endless_mode_crosses_epoch_boundaries_without_waiting(data, slow_draws):
    x, y = data
    slow_draws["epochs"], slow_draws["delay"] = {1, 2, 3}, 0.3
    loader = PrefetchLoader((x, y), 8192, shuffle=True, seed=6, epochs=None)
    it = iter(loader)
    per_epoch = len(loader)
    refs = [ref_batches(len(y), 8192, 6, e) for e in range(3)]
    for k in range(3 * per_epoch):
        t0 = time.perf_counter()
        b = next(it)
        if k and k % per_epoch == 0:
            assert time.perf_counter() - t0 < 0.15, f"waited at the start of epoch {k // per_epoch}"
        check(b, refs[k // per_epoch][k % per_epoch])
        time.sleep(0.6 / per_epoch)
    it.close()


def test_a_failed_draw_fails_next_and_keeps_the_position(data, monkeypatch):
    x, y = data
    real = _loader_order.epoch_order
    failing = {1}

    def epoch_order(num_rows, seed, epoch, shuffle):
        if epoch in failing:
            raise MemoryError("no memory for epoch 1's order")
        return real(num_rows, seed, epoch, shuffle)

    monkeypatch.setattr(_loader_order, "epoch_order", epoch_order)
    loader = PrefetchLoader((x, y), 8192, shuffle=True, seed=8, epochs=None)
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    with pytest.raises(MemoryError, match="epoch 1's order"):
        next(it)
    assert (loader.epoch, loader.batch) == (1, 0)
    failing.clear()  # the failed draw is forgotten: iterating again draws it again
    it = iter(loader)
    for rows in ref_batches(len(y), 8192, 8, 1):
        check(next(it), rows)
    loader.close()


def _gather_threads() -> set:
    """Thread ids of the loaders' gather threads alive in this process (the native side names them)."""
    tids = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == "tp-gather":
                    tids.add(int(tid))
        except (FileNotFoundError, ProcessLookupError):  # ended while listed
            pass
    return tids


def test_threads_wait_between_loops_and_end_with_close_or_the_loader(data):
    x, y = data
    gc.collect()
    others = _gather_threads()  # another test's loader may still be ending: only new threads count
    loader = PrefetchLoader((x, y), 4096, shuffle=True, num_threads=3)
    list(loader)
    ours = _gather_threads() - others
    assert len(ours) == 3  # idle, waiting for the next loop
    list(loader)
    assert _gather_threads() - others == ours  # the same threads again, no new ones
    loader.close()
    assert _wait_until_gone(ours) == set()
    list(loader)
    again = _gather_threads() - others - ours
    assert len(again) == 3  # a loop after close() starts its own
    del loader
    gc.collect()
    assert _wait_until_gone(again) == set()


def _wait_until_gone(tids: set, timeout: float = 2.0) -> set:
    """Those of ``tids`` still alive once all have ended or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while (alive := tids & _gather_threads()) and time.monotonic() < deadline:
        time.sleep(0.005)
    return alive


def _pages_present(addresses) -> np.ndarray:
    """Whether each virtual address's page is mapped in this process (/proc/self/pagemap bit 63)."""
    page = os.sysconf("SC_PAGE_SIZE")
    out = []
    with open("/proc/self/pagemap", "rb") as f:
        for a in addresses:
            f.seek(a // page * 8)
            out.append(int.from_bytes(f.read(8), "little") >> 63)
    return np.array(out, dtype=bool)


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="needs Linux /proc/self/pagemap")
def test_the_first_batchs_rows_are_mapped_before_iter(tmp_path):
    n, d = BIG + 100, 1024  # 4 KiB rows: one page each
    path = tmp_path / "x.f32"
    np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d)).flush()
    x = np.memmap(path, dtype=np.float32, mode="r", shape=(n, d))  # a fresh mapping: nothing mapped yet
    base = x.__array_interface__["data"][0]
    first = ref_batches(n, 256, 7, 0)[0]
    assert _pages_present(base + first * d * 4).mean() < 0.5
    loader = PrefetchLoader(x, 256, shuffle=True, seed=7)
    deadline = time.monotonic() + 10
    while not _pages_present(base + first * d * 4).all() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _pages_present(base + first * d * 4).all()
    loader.close()


def test_touching_a_truncated_file_does_nothing_instead_of_crashing(tmp_path):
    """LoaderSource.touch reads a memmap's rows; a file truncated under the mapping would make that
    a SIGBUS, so it checks the size first (run in a subprocess: the failure mode is a crash)."""
    script = textwrap.dedent(f"""
        import os, numpy as np
        from trainpatterns import _kernels
        path = {str(tmp_path / "t.f32")!r}
        np.memmap(path, dtype=np.float32, mode="w+", shape=(4096, 1024)).flush()
        x = np.memmap(path, dtype=np.float32, mode="r", shape=(4096, 1024))
        src = _kernels.loader_source("x", x)
        os.truncate(path, 4096 * 1024)
        src.touch(np.arange(2048, 4096))
        print("survived")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "survived" in res.stdout, (res.returncode, res.stderr[-2000:])


def _iterate_in_child(loader, q):
    q.put([b[1].numpy().copy() for b in loader])


@pytest.mark.timeout(60)
def test_a_forked_child_iterates_without_the_parents_threads_or_draws(data, slow_draws):
    """The parent's kept threads and its pending background draw do not exist in a forked child:
    the child starts its own and gets the documented batches."""
    x, y = data
    slow_draws["epochs"] = {1}  # epoch 1's order is drawn slowly, in the child too
    loader = PrefetchLoader((x, y), 8192, shuffle=True, seed=9)
    list(loader)  # epoch 0 done: threads kept, epoch 1's order still being drawn
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_iterate_in_child, args=(loader, q))
    p.start()
    got = q.get(timeout=30)
    p.join(timeout=30)
    assert p.exitcode == 0
    ref = ref_batches(len(y), 8192, 9, 1)
    assert len(got) == len(ref)
    for labels, rows in zip(got, ref):
        np.testing.assert_array_equal(labels, rows * 3)
    for b, rows in zip(list(loader), ref):  # the parent is unaffected
        check(b, rows)
