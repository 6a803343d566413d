"""PrefetchLoader(rank=, world_size=): each rank's batches against a reference written out here.

Reference: epoch ``e``'s order is ``np.random.Generator(np.random.PCG64([seed, e])).permutation(n)``;
with ``world_size`` w it is extended by wrapping around to ``ceil(n / w) * w`` positions (drop_last
off) or cut to ``(n // w) * w`` (on), and rank r takes positions r, r + w, ... (torch's
DistributedSampler); that list is cut into batches, the short last one dropped with drop_last. Rows
of the source carry their own index, so each batch is checked element by element against it. Several
"ranks" run in one process: sharding needs no process group.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainpatterns import PrefetchLoader


def ref_rank_batches(n, batch_size, seed, epoch, rank, world, shuffle=True, drop_last=False):
    order = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n) if shuffle else np.arange(n)
    total = (n // world) * world if drop_last else -(-n // world) * world
    mine = [int(order[p % n]) for p in range(rank, total, world)]
    stop = (len(mine) // batch_size) * batch_size if drop_last else len(mine)
    return [mine[i:i + batch_size] for i in range(0, stop, batch_size)]


def sources(n):
    """Rows that name themselves: x[i] = (i, 2i + 1) as int64, y[i] = i as float32."""
    i = np.arange(n, dtype=np.int64)
    return np.stack([i, 2 * i + 1], axis=1), i.astype(np.float32)


def check_batch(batch, rows):
    x, y = batch
    expect = torch.tensor(rows, dtype=torch.int64)
    assert torch.equal(x, torch.stack([expect, 2 * expect + 1], dim=1))
    assert torch.equal(y, expect.to(torch.float32))


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 90), world=st.integers(1, 5), batch_size=st.integers(1, 17), seed=st.integers(0, 2**32),
       shuffle=st.booleans(), drop_last=st.booleans())
def test_each_rank_gets_its_documented_share(n, world, batch_size, seed, shuffle, drop_last):
    x, y = sources(n)
    counts = set()
    for rank in range(world):
        loader = PrefetchLoader((x, y), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank,
                                world_size=world, num_threads=2, epochs=2)
        expect = [b for e in range(2) for b in ref_rank_batches(n, batch_size, seed, e, rank, world, shuffle, drop_last)]
        got = list(loader)
        assert len(got) == len(expect) == 2 * len(loader)
        for batch, rows in zip(got, expect):
            check_batch(batch, rows)
        counts.add(len(loader))
    assert len(counts) == 1  # every rank has as many batches: ranks stay in step


def rows_of_epoch(n, world, batch_size, drop_last, seed=5):
    x, y = sources(n)
    per_rank = []
    for rank in range(world):
        loader = PrefetchLoader((x, y), batch_size, shuffle=True, seed=seed, drop_last=drop_last, rank=rank,
                                world_size=world)
        per_rank.append([int(v) for batch in loader for v in batch[1].tolist()])
    return per_rank


def test_without_drop_last_the_ranks_cover_every_row_and_wrap_only_the_padding():
    n, world = 103, 4  # 26 rows each: 104 positions, one row of the permutation seen twice
    per_rank = rows_of_epoch(n, world, 10, drop_last=False)
    assert [len(r) for r in per_rank] == [26] * 4
    seen = [v for r in per_rank for v in r]
    assert set(seen) == set(range(n))
    first = int(np.random.Generator(np.random.PCG64([5, 0])).permutation(n)[0])
    assert sorted(v for v in set(seen) if seen.count(v) > 1) == [first]


def test_with_drop_last_the_ranks_are_disjoint():
    n, world = 103, 2  # 51 rows each (one row left out), 5 full batches of 10 each
    per_rank = rows_of_epoch(n, world, 10, drop_last=True)
    assert [len(r) for r in per_rank] == [50, 50]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == 100


def test_one_rank_is_the_unsharded_loader():
    x, y = sources(57)
    plain = list(PrefetchLoader((x, y), 8, shuffle=True, seed=3))
    sharded = list(PrefetchLoader((x, y), 8, shuffle=True, seed=3, rank=0, world_size=1))
    assert len(plain) == len(sharded)
    for a, b in zip(plain, sharded):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 80), world=st.integers(2, 4), batch_size=st.integers(1, 9), taken=st.integers(0, 40),
       drop_last=st.booleans(), data=st.data())
def test_resume_mid_epoch_continues_with_the_same_batches(n, world, batch_size, taken, drop_last, data):
    rank = data.draw(st.integers(0, world - 1))
    x, y = sources(n)
    kwargs = dict(shuffle=True, seed=11, drop_last=drop_last, rank=rank, world_size=world, epochs=None)
    first = PrefetchLoader((x, y), batch_size, **kwargs)
    if len(first) == 0:
        return
    it = iter(first)
    for _ in range(taken):
        next(it)
    state = first.state_dict()
    expect = [next(it) for _ in range(2 * len(first) + 1)]  # crosses at least one epoch boundary
    first.close()
    resumed = PrefetchLoader((x, y), batch_size, **kwargs)
    resumed.load_state_dict(state)
    got = resumed.__iter__()
    for e in expect:
        b = next(got)
        assert torch.equal(b[0], e[0]) and torch.equal(b[1], e[1])
    resumed.close()
    # And against the reference: the position names the epoch and batch the next batch comes from.
    epoch, batch = divmod(taken, len(first))
    ref = [b for e in range(epoch, epoch + 4) for b in ref_rank_batches(n, batch_size, 11, e, rank, world,
                                                                       drop_last=drop_last)]
    for e, rows in zip(expect, ref[batch:]):
        check_batch(e, rows)


def test_any_ranks_state_resumes_every_rank():
    x, y = sources(40)
    ranks = [PrefetchLoader((x, y), 4, shuffle=True, rank=r, world_size=2, epochs=None) for r in range(2)]
    its = [iter(ld) for ld in ranks]
    for _ in range(3):
        for it in its:
            next(it)
    state = ranks[0].state_dict()
    expect = next(its[1])
    other = PrefetchLoader((x, y), 4, shuffle=True, rank=1, world_size=2)
    other.load_state_dict(state)
    got = next(iter(other))
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    for ld in ranks + [other]:
        ld.close()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=2, world_size=2), ValueError, "rank must be < world_size"),
    (dict(rank=-1, world_size=2), ValueError, "rank must be >= 0"),
    (dict(rank=0, world_size=0), ValueError, "world_size must be >= 1"),
    (dict(rank=1.0, world_size=2), TypeError, "rank must be an int"),
    (dict(rank=0, world_size=True), TypeError, "world_size must be an int"),
])
def test_bad_rank_or_world_size_is_refused(kwargs, error, match):
    x, y = sources(10)
    with pytest.raises(error, match=match):
        PrefetchLoader((x, y), 2, **kwargs)


def test_state_of_another_world_size_is_refused():
    x, y = sources(10)
    state = PrefetchLoader((x, y), 2, rank=0, world_size=2).state_dict()
    assert state["world_size"] == 2
    with pytest.raises(ValueError, match="world_size=2"):
        PrefetchLoader((x, y), 2).load_state_dict(state)
    unsharded = {k: v for k, v in PrefetchLoader((x, y), 2).state_dict().items() if k != "world_size"}
    with pytest.raises(ValueError, match="world_size=1"):  # a state without the key is one process's
        PrefetchLoader((x, y), 2, rank=1, world_size=2).load_state_dict(unsharded)


def test_more_ranks_than_rows():
    x, y = sources(3)
    for drop_last, expect in ((False, 1), (True, 0)):
        lens = [len(PrefetchLoader((x, y), 4, rank=r, world_size=5, drop_last=drop_last)) for r in range(5)]
        assert lens == [expect] * 5
    got = [list(PrefetchLoader((x, y), 4, rank=r, world_size=5)) for r in range(5)]
    for rank, batches in enumerate(got):
        check_batch(batches[0], [rank % 3])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sharded_batches_on_the_gpu():
    x, y = sources(101)
    for rank in range(3):
        loader = PrefetchLoader((x, y), 8, shuffle=True, seed=2, rank=rank, world_size=3, device="cuda", epochs=2)
        expect = [b for e in range(2) for b in ref_rank_batches(101, 8, 2, e, rank, 3)]
        got = list(loader)
        assert len(got) == len(expect)
        for (xb, yb), rows in zip(got, expect):
            assert xb.device.type == "cuda"
            check_batch((xb.cpu(), yb.cpu()), rows)
