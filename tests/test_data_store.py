"""write_array_store / open_array_store / PrefetchLoader.from_store against the original dataset.

Reference: a plain loop over the dataset, ``default_collate([dataset[i] for i in rows])``, with
``rows`` the loader's documented order (epoch ``e``: ``np.random.Generator(np.random.PCG64([seed,
e])).permutation(n)`` cut in slices of ``batch_size``). Batches from the store must equal it element
by element and have the item's structure. A conversion killed midway runs in a subprocess.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset, IterableDataset, default_collate

from trainpatterns import PrefetchLoader
from trainpatterns.data import open_array_store, write_array_store


def ref_rows(n, batch_size, seed, epoch, shuffle=True, drop_last=False):
    order = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n) if shuffle else np.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i:i + batch_size].tolist() for i in range(0, stop, batch_size)]


def assert_same(got, expect):
    """Batch ``got`` equals ``expect`` (default_collate's) leaf by leaf: dtype, shape and values."""
    if isinstance(expect, dict):
        assert isinstance(got, dict) and list(got) == list(expect)
        for k in expect:
            assert_same(got[k], expect[k])
    elif isinstance(expect, (list, tuple)):
        assert len(got) == len(expect)
        for g, e in zip(got, expect):
            assert_same(g, e)
    else:
        assert got.dtype == expect.dtype and got.shape == expect.shape
        assert torch.equal(got, expect)


class Features(Dataset):
    """(float32 [d] built from an in-memory array, Python int label)."""

    def __init__(self, n, d=7):
        self.x = np.random.default_rng(n).standard_normal((n, d), dtype=np.float32)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]) * 3 - 1, i * 7 % 5


class Images(Dataset):
    """Dict items: a uint8 image [3, 5, 7], a float16 vector, a bool flag, a float (float64)."""

    def __len__(self):
        return 61

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randint(0, 256, (3, 5, 7), generator=g, dtype=torch.uint8),
                "aux": torch.randn(4, generator=g).half(), "flag": bool(i % 3), "weight": i / 7}


def check_store_batches(dataset, path, batch_size, seed=0, epochs=2, drop_last=False, **kwargs):
    loader = PrefetchLoader.from_store(path, batch_size, shuffle=True, seed=seed, drop_last=drop_last, **kwargs)
    batches = []
    for _ in range(epochs):
        batches += list(loader)
    expect = [rows for e in range(epochs) for rows in ref_rows(len(dataset), batch_size, seed, e, True, drop_last)]
    assert len(batches) == len(expect)
    for got, rows in zip(batches, expect):
        assert_same(got, default_collate([dataset[i] for i in rows]))
    return batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_tuple_items_round_trip(tmp_path, num_workers):
    ds = Features(1237)
    assert write_array_store(ds, tmp_path / "store", num_workers=num_workers, progress=False) == tmp_path / "store"
    batches = check_store_batches(ds, tmp_path / "store", 100, seed=3)
    assert isinstance(batches[0], tuple)
    assert sorted(os.listdir(tmp_path)) == ["store"]  # no temporary directory left behind


def test_dict_items_with_an_image_field(tmp_path):
    ds = Images()
    write_array_store(ds, tmp_path / "img", num_workers=2, progress=False)
    fields = open_array_store(tmp_path / "img")
    assert fields["image"].dtype == np.uint8 and fields["image"].shape == (61, 3, 5, 7)
    assert isinstance(fields["image"], np.memmap) and not fields["image"].flags.writeable
    check_store_batches(ds, tmp_path / "img", 8, seed=1, drop_last=True)
    check_store_batches(ds, tmp_path / "img", 64, seed=2, epochs=1)  # one batch larger than the data


class Mixed(Dataset):
    """List items of the other dtypes, bfloat16 included, some given as numpy arrays and scalars."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return [torch.tensor([i / 3, -i], dtype=torch.bfloat16), np.arange(3, dtype=np.int16) * i,
                np.float64(i) / 9, torch.tensor(i, dtype=torch.int32), np.int8(i % 100), torch.tensor([i, i + 1.5]).double()]


def test_list_items_of_every_dtype(tmp_path):
    ds = Mixed(45)
    write_array_store(ds, tmp_path / "m", num_workers=0, progress=False)
    batches = check_store_batches(ds, tmp_path / "m", 7, seed=4, epochs=1)
    assert isinstance(batches[0], list) and batches[0][0].dtype == torch.bfloat16


class Tiny(Dataset):
    def __init__(self, n, shape, dtype):
        self.n, self.shape, self.dtype = n, shape, dtype

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (torch.arange(int(np.prod(self.shape)), dtype=torch.float64).reshape(self.shape) + i).to(self.dtype)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 130), batch_size=st.integers(1, 40), shape=st.lists(st.integers(1, 5), max_size=3),
       dtype=st.sampled_from([torch.float32, torch.uint8, torch.int64, torch.float16]), drop_last=st.booleans())
def test_odd_sizes_round_trip(tmp_path_factory, n, batch_size, shape, dtype, drop_last):
    ds = Tiny(n, tuple(shape), dtype)
    path = tmp_path_factory.mktemp("odd") / "s"
    write_array_store(ds, path, num_workers=0, progress=False)
    batches = check_store_batches(ds, path, batch_size, seed=n, epochs=1, drop_last=drop_last)
    assert all(isinstance(b, torch.Tensor) for b in batches)


def test_sharded_loader_over_a_store(tmp_path):
    ds = Features(50)
    write_array_store(ds, tmp_path / "s", num_workers=0, progress=False)
    seen = []
    for rank in range(2):
        for x, y in PrefetchLoader.from_store(tmp_path / "s", 5, shuffle=True, drop_last=True, rank=rank,
                                              world_size=2):
            seen += [int(v) for v in torch.nonzero(torch.isin(torch.from_numpy(ds.x) * 3 - 1, x).all(1)).flatten()]
    assert sorted(seen) == list(range(50))


def test_progress_bar(tmp_path, capsys):
    write_array_store(Features(30), tmp_path / "s", num_workers=0, progress=True)
    assert "30/30" in capsys.readouterr().err


# ---- bad datasets ----
class Broken(Dataset):
    """Item ``at`` differs from item 0 as ``how`` says."""

    def __init__(self, how, at=13, n=40):
        self.how, self.at, self.n = how, at, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = {"x": torch.zeros(4), "y": 1}
        if i == self.at:
            if self.how == "shape":
                item["x"] = torch.zeros(5)
            elif self.how == "dtype":
                item["y"] = 1.0
            elif self.how == "keys":
                item = {"x": torch.zeros(4)}
            elif self.how == "raises":
                raise KeyError("no such sample")
        return item


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("how, error, match", [
    ("shape", ValueError, r"dataset\[13\] field 'x' has dtype float32 and shape \(5,\).*shape \(4,\)"),
    ("dtype", ValueError, r"dataset\[13\] field 'y' has dtype float64.*dtype int64"),
    ("keys", ValueError, r"dataset\[13\] is a dict with keys \['x'\], but dataset\[0\] is a dict with keys"),
    ("raises", RuntimeError, r"dataset\[13\] raised KeyError"),
])
def test_an_item_unlike_item_0_names_index_and_field(tmp_path, num_workers, how, error, match):
    with pytest.raises(error, match=match):
        write_array_store(Broken(how), tmp_path / "s", num_workers=num_workers, progress=False)
    assert os.listdir(tmp_path) == []  # neither a store nor its temporary directory


class Stream(IterableDataset):
    def __iter__(self):
        return iter([torch.zeros(2)])


class Odd(Dataset):
    def __init__(self, item):
        self.item = item

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return self.item


@pytest.mark.parametrize("dataset, error, match", [
    (Stream(), TypeError, "map-style dataset"),
    (iter([1, 2]), TypeError, "map-style dataset"),
    ([], ValueError, "the dataset is empty"),
    (Odd(("a", 1)), TypeError, r"dataset\[0\] field 0: is a str"),
    (Odd((torch.zeros(2, dtype=torch.complex64),)), TypeError, r"field 0: dtype torch.complex64 is not one"),
    (Odd(np.zeros(2, dtype=np.uint32)), TypeError, "dtype uint32 is not one"),
    (Odd({1: torch.zeros(1)}), TypeError, "string keys"),
    (Odd((torch.zeros(2, 0),)), ValueError, "no elements"),
    (Odd(((torch.zeros(2), 1),)), TypeError, r"field 0: is a tuple"),
])
def test_bad_datasets_are_refused(tmp_path, dataset, error, match):
    with pytest.raises(error, match=match):
        write_array_store(dataset, tmp_path / "s", num_workers=0, progress=False)
    assert os.listdir(tmp_path) == []


def test_existing_path(tmp_path):
    write_array_store(Features(10), tmp_path / "s", num_workers=0, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_array_store(Features(20), tmp_path / "s", num_workers=0, progress=False)
    write_array_store(Features(20), tmp_path / "s", num_workers=0, progress=False, overwrite=True)
    assert open_array_store(tmp_path / "s")[0].shape == (20, 7)
    assert sorted(os.listdir(tmp_path)) == ["s"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an array store"):
        write_array_store(Features(20), tmp_path / "mine", num_workers=0, progress=False, overwrite=True)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"


# ---- damaged stores ----
@pytest.fixture
def store(tmp_path):
    write_array_store(Features(12), tmp_path / "s", num_workers=0, progress=False)
    return tmp_path / "s"


def edit_manifest(store, change):
    m = json.loads((store / "manifest.json").read_text())
    change(m)
    (store / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(format="something else"), "not an array store manifest"),
    (lambda m: m.update(version=99), "format version 99"),
    (lambda m: m.pop("num_rows"), "missing entry 'num_rows'"),
    (lambda m: m.update(num_rows=0), "num_rows 0"),
    (lambda m: m.update(structure="set"), "structure 'set'"),
    (lambda m: m["fields"][0].update(dtype="complex64"), "dtype 'complex64'"),
    (lambda m: m["fields"][0].update(file="../field0.bin"), "file '../field0.bin'"),
    (lambda m: m["fields"][1].update(shape=[0]), r"shape \(0,\)"),
    (lambda m: m.update(num_rows=13), r"field0.bin has 336 bytes, but the manifest says 13 rows"),
])
def test_corrupt_manifest(store, change, match):
    edit_manifest(store, change)
    with pytest.raises(ValueError, match=match):
        PrefetchLoader.from_store(store, 4)


def test_unreadable_or_missing_parts(store, tmp_path):
    (store / "manifest.json").write_text('{"format": "trainpatterns.array_store", "vers')
    with pytest.raises(ValueError, match="corrupt array store manifest"):
        open_array_store(store)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        open_array_store(tmp_path / "nowhere")
    write_array_store(Features(12), tmp_path / "t", num_workers=0, progress=False)
    with open(tmp_path / "t" / "field1.bin", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="field1.bin has 40 bytes.*damaged"):
        PrefetchLoader.from_store(tmp_path / "t", 4)
    os.remove(tmp_path / "t" / "field1.bin")
    with pytest.raises(FileNotFoundError, match="field1.bin is missing"):
        PrefetchLoader.from_store(tmp_path / "t", 4)


KILLED_WORKER = textwrap.dedent("""
    import sys, time, torch
    from torch.utils.data import Dataset
    from trainpatterns.data import write_array_store

    class Slow(Dataset):
        def __len__(self):
            return 400
        def __getitem__(self, i):
            if i == 0:
                print("started", flush=True)
            time.sleep(0.01)
            return torch.full((3,), float(i))

    write_array_store(Slow(), sys.argv[1], num_workers=2, progress=False)
    print("finished", flush=True)
""")


def test_a_killed_conversion_leaves_no_store(tmp_path):
    target = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(target)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the kill reaches the workers too
    try:
        assert proc.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 30
        while not any(p.name.startswith(".s.tmp-") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # well inside the 2 s the 400 items take on two workers
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    with pytest.raises(FileNotFoundError, match="no array store"):
        open_array_store(target)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".s.tmp-")]  # the half-written one
