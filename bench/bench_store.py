"""Benchmark: an array store (write_array_store + PrefetchLoader.from_store) vs DataLoader on the dataset.

Data: a map-style Dataset whose ``__getitem__`` builds a fixed-shape float32 tensor from an
in-memory array (200k rows x 64, ``--quick``: 20k) plus an int label, batch 1024, shuffled.

Measured in turns in one process (bench/_common.py):
  conversion        write_array_store(dataset, dir, num_workers=0 and 2), rows/s; beside it a plain
                    loop over ``dataset[i]`` in this process (reading the items once, nothing
                    written): the floor a one-process conversion cannot beat
  epoch             one shuffled epoch of PrefetchLoader.from_store(dir, 1024, shuffle=True) vs
                    DataLoader(dataset, 1024, shuffle=True, num_workers=2, persistent_workers=True)
                    (persistent: its workers' start is not charged to every epoch)

Targets: one epoch from the store >= 10x the DataLoader's. For context: how many DataLoader epochs
the conversion (2 workers) costs, i.e. after how many epochs the store has paid for itself.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Target, Variant, apply_threads, common_parser, environment,  # noqa: E402
                     format_targets, measure, write_json)

from trainpatterns import PrefetchLoader  # noqa: E402
from trainpatterns.data import write_array_store  # noqa: E402

BATCH = 1024
FEATURES = 64


class SyntheticDataset(torch.utils.data.Dataset):
    """The usual map-style dataset: a little tensor work per row on an in-memory array."""

    def __init__(self, rows: int):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((rows, FEATURES), dtype=np.float32)
        self.y = rng.integers(0, 10, rows)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]) * 0.5 + 1.0, int(self.y[i])


def epoch_fn(make_iterable):
    def run():
        n = 0
        for _ in make_iterable():
            n += 1
        return n
    return run


def main() -> int:
    p = common_parser(__doc__)
    p.add_argument("--rows", type=int, default=None, help="dataset rows (default 200k, --quick 20k)")
    p.add_argument("--dir", default=None, help="where to write the stores (default: a temporary directory)")
    args = p.parse_args()
    apply_threads(args.threads)
    rows = args.rows or (20_000 if args.quick else 200_000)
    repeats = 2 if args.quick else 5
    env = environment()
    print(f"bench_store: {rows} rows x {FEATURES} float32 + int label, batch {BATCH}, shuffled; "
          f"torch threads {env['threads']}, cpus {env['cpus']}, {env['cpu']}")
    ds = SyntheticDataset(rows)
    tmp = tempfile.mkdtemp(prefix="tp_bench_store_", dir=args.dir)
    try:
        runs = [0]

        def convert(workers):
            def run():
                runs[0] += 1
                path = os.path.join(tmp, f"store{runs[0]}")
                write_array_store(ds, path, num_workers=workers, progress=False)
                shutil.rmtree(path)
            return run

        def read_items():
            for i in range(rows):
                ds[i]

        conv = measure([Variant("read items (1 process)", read_items, role="floor"),
                        Variant("write_array_store w0", convert(0), role="ours"),
                        Variant("write_array_store w2", convert(2), role="ours")],
                       repeats=repeats, warmup=1, min_sample_s=0.0)
        print("\nconversion")
        head = f"{'variant':<24}  {'median s':>9}  {'rows/s':>10}  {'of floor':>8}"
        print(head + "\n" + "-" * len(head))
        floor = conv[0].median
        for r in conv:
            print(f"{r.name:<24}  {r.median:>9.3f}  {rows / r.median:>10,.0f}  {floor / r.median:>8.2f}")

        store = os.path.join(tmp, "store")
        write_array_store(ds, store, num_workers=2, progress=False)
        ours = PrefetchLoader.from_store(store, BATCH, shuffle=True, seed=0, prefetch=4)
        dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)
        epoch = measure([Variant("DataLoader w2", epoch_fn(lambda: dl), role="torch"),
                         Variant("from_store", epoch_fn(lambda: ours), role="ours")],
                        repeats=repeats, warmup=1, min_sample_s=0.0)
        t = {r.name: r.median for r in epoch}
        print("\none shuffled epoch")
        head = f"{'variant':<24}  {'median s':>9}  {'rows/s':>10}  {'speedup':>8}"
        print(head + "\n" + "-" * len(head))
        for r in epoch:
            print(f"{r.name:<24}  {r.median:>9.3f}  {rows / r.median:>10,.0f}  {t['DataLoader w2'] / r.median:>7.2f}x")
        ours.close()
        del dl

        conv_w2 = conv[2].median
        targets = [
            Target("epoch: DataLoader(w2) / from_store", t["DataLoader w2"] / t["from_store"], 10.0),
            Target("conversion (w2) in DataLoader(w2) epochs", conv_w2 / t["DataLoader w2"], None,
                   note="the store has paid for itself after about this many epochs"),
            Target("conversion rows/s, 2 workers / 0", conv[1].median / conv_w2, None),
        ]
        print("\ntargets (the box is shared: ratios are taken in one process, in turns)")
        print(format_targets(targets))
        write_json(args.json, dict(
            benchmark="bench_store", environment=env, rows=rows, batch=BATCH, features=FEATURES,
            conversion=[dict(r.to_dict(), rows_per_s=rows / r.median) for r in conv],
            epoch=[dict(r.to_dict(), rows_per_s=rows / r.median) for r in epoch],
            targets=[tg.to_dict() for tg in targets]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(tg.passed is not False for tg in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
