"""Benchmark: PrefetchLoader vs torch DataLoader and a plain numpy gather, one shuffled epoch.

Data: an ``np.memmap`` of 1M rows x 256 float32 features (1 GiB, in a temporary directory deleted
afterwards; ``--quick``: 100k rows) plus int64 labels in memory, batch 1024, shuffled.

Variants, measured in turns in one process (bench/_common.py):
  ours              PrefetchLoader((features, labels), 1024, shuffle=True): one epoch
  numpy gather      features[idx], labels[idx] per batch in a Python loop: the in-process ceiling
  DataLoader/row    a per-row Dataset (``__getitem__``) with num_workers 0 and 2 (persistent
                    workers); these are slow, so they time the first ``--row-batches`` batches of an
                    epoch and report samples/s over those
  DataLoader/batch  a Dataset with batched ``__getitems__`` (one fancy index per batch), 0 workers

Overlap case: a consumer that runs a matmul per batch (one torch thread), sized to take about as
long as gathering a batch; the epoch through ours (one gather thread) vs the same matmuls on an
already loaded batch (compute only). This needs the second core free: on a shared, loaded box it
measures the box. For context, also a consumer that sleeps that long per batch (a GPU-bound step
as the host sees it).

Targets (CPU): ours >= 10x the best per-row DataLoader; >= 0.8x the numpy gather; the overlapped
epoch within 1.15x of compute only. On a GPU (when one exists) also: a small model's epoch with
ours on cuda vs DataLoader(pin_memory=True, num_workers=4) + .to(device, non_blocking=True).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Target, Variant, apply_threads, common_parser, environment,  # noqa: E402
                     format_targets, measure, write_json)

from trainpatterns import PrefetchLoader  # noqa: E402
from trainpatterns.data import epoch_order  # noqa: E402

BATCH = 1024
FEATURES = 256


class RowDataset(torch.utils.data.Dataset):
    """The usual map-style dataset: one row per ``__getitem__``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(np.asarray(self.x[i])), int(self.y[i])


class BatchedDataset(RowDataset):
    """``__getitems__``: the DataLoader fetches a whole batch with one fancy index."""

    def __getitems__(self, idx):
        idx = np.asarray(idx)
        return torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])


def make_memmap(path: str, rows: int) -> np.memmap:
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(rows, FEATURES))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 65536):
        stop = min(rows, start + 65536)
        mm[start:stop] = rng.standard_normal((stop - start, FEATURES), dtype=np.float32)
    mm.flush()
    del mm
    # r+ rather than r: torch.from_numpy in the per-row baseline warns on read-only arrays.
    return np.memmap(path, dtype=np.float32, mode="r+", shape=(rows, FEATURES))


def epoch_fn(iterable_factory, max_batches=None):
    """One call: iterate (up to max_batches) batches, touching each so lazy work is counted."""
    def run():
        n = 0
        for b in iterable_factory():
            n += 1
            if max_batches is not None and n >= max_batches:
                break
        return n
    return run


def main() -> int:
    p = common_parser(__doc__)
    p.add_argument("--rows", type=int, default=None, help="rows in the memmap (default 1M, --quick 100k)")
    p.add_argument("--loader-threads", type=int, default=2, help="PrefetchLoader num_threads (default 2)")
    p.add_argument("--row-batches", type=int, default=None,
                   help="batches timed for the per-row DataLoaders (default 200, --quick 40)")
    p.add_argument("--pin-cores", action="store_true",
                   help="overlap case: consumer on CPU 0, loader threads on the others (on a busy shared box "
                        "the scheduler otherwise tends to put a woken loader thread on the consumer's core)")
    args = p.parse_args()
    apply_threads(args.threads)
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    row_batches = args.row_batches or (40 if args.quick else 200)
    repeats = 3 if args.quick else 5
    env = environment()
    print(f"bench_loader: {rows} rows x {FEATURES} float32 (memmap) + int64 labels, batch {BATCH}, shuffled; "
          f"torch threads {env['threads']}, cpus {env['cpus']}, {env['cpu']}")

    with tempfile.TemporaryDirectory(prefix="tp_bench_loader_") as tmp:
        x = make_memmap(os.path.join(tmp, "features.f32"), rows)
        y = np.random.default_rng(1).integers(0, 1000, rows).astype(np.int64)
        n_batches = -(-rows // BATCH)
        epoch_counter = [0]

        def ours_loader(**kw):
            return PrefetchLoader((x, y), BATCH, shuffle=True, seed=0, num_threads=args.loader_threads,
                                  prefetch=4, **kw)

        ours = ours_loader()

        def numpy_epoch():
            epoch_counter[0] += 1
            order = epoch_order(rows, 0, epoch_counter[0], True)
            for s in range(0, rows, BATCH):
                idx = order[s:s + BATCH]
                xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            return xb, yb

        row_ds, batched_ds = RowDataset(x, y), BatchedDataset(x, y)
        dl_row0 = torch.utils.data.DataLoader(row_ds, batch_size=BATCH, shuffle=True, num_workers=0)
        dl_row2 = torch.utils.data.DataLoader(row_ds, batch_size=BATCH, shuffle=True, num_workers=2,
                                              persistent_workers=True)
        dl_batched = torch.utils.data.DataLoader(batched_ds, batch_size=BATCH, shuffle=True, num_workers=0,
                                                 collate_fn=lambda b: b)
        row_n = min(row_batches, n_batches)
        variants = [
            Variant("ours", epoch_fn(lambda: ours), role="ours"),
            Variant("numpy gather", numpy_epoch, role="ceiling"),
            Variant("DataLoader/row w0", epoch_fn(lambda: dl_row0, row_n), role="torch"),
            Variant("DataLoader/row w2", epoch_fn(lambda: dl_row2, row_n), role="torch"),
            Variant("DataLoader/batch w0", epoch_fn(lambda: dl_batched), role="torch"),
        ]
        samples = {"ours": rows, "numpy gather": rows, "DataLoader/row w0": row_n * BATCH,
                   "DataLoader/row w2": row_n * BATCH, "DataLoader/batch w0": rows}
        numpy_epoch()  # first pass pulls the file into the page cache for everyone
        results = measure(variants, repeats=repeats, warmup=1, min_sample_s=0.0)
        rate = {r.name: samples[r.name] / r.median for r in results}
        print(f"\nthroughput (one epoch; per-row DataLoaders: first {row_n} batches)")
        head = f"{'variant':<20}  {'samples':>9}  {'median s':>9}  {'samples/s':>11}  {'GB/s':>6}  {'ours is':>8}"
        print(head + "\n" + "-" * len(head))
        for r in results:
            gbps = rate[r.name] * (FEATURES * 4 + 8) / 1e9
            print(f"{r.name:<20}  {samples[r.name]:>9}  {r.median:>9.3f}  {rate[r.name]:>11,.0f}  {gbps:>6.2f}  "
                  f"{rate['ours'] / rate[r.name]:>7.2f}x")

        # ---- overlap: compute per batch about as long as loading one ----
        # Two cores in all: the consumer's matmul gets one torch thread, the loader one gather
        # thread, so "overlapped" means the two run side by side rather than taking turns.
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        xb0 = torch.from_numpy(x[:BATCH].copy())
        load_s = BATCH / rate["numpy gather"]  # one batch's gather on one thread

        def time_mm(w):
            for _ in range(3):
                torch.mm(xb0, w)
            t0 = time.perf_counter()
            for _ in range(20):
                torch.mm(xb0, w)
            return (time.perf_counter() - t0) / 20

        width = 8
        while True:  # grow the matmul until it takes about one batch's load time
            w = torch.randn(FEATURES, width)
            per = time_mm(w)
            if per >= load_s or width >= 1 << 16:
                break
            width *= 2
        overlap_batches = min(n_batches, 400 if args.quick else n_batches)

        def compute_only():
            for _ in range(overlap_batches):
                torch.mm(xb0, w)

        overlap_loader = PrefetchLoader((x, y), BATCH, shuffle=True, seed=0, num_threads=1, prefetch=4,
                                        epochs=None)
        cpus = sorted(os.sched_getaffinity(0))
        pinned = args.pin_cores and len(cpus) > 1
        if pinned:  # threads inherit the creating thread's affinity: create them on the other cores
            os.sched_setaffinity(0, cpus[1:])
        overlap_it = iter(overlap_loader)
        next(overlap_it)
        if pinned:
            os.sched_setaffinity(0, cpus[:1])

        def overlapped():
            for _ in range(overlap_batches):
                xb, _ = next(overlap_it)
                torch.mm(xb, w)

        # The same with a consumer that waits a fixed time per batch without using a core (what a
        # training step on a GPU looks like to the host): overlap that needs no spare core.
        def wait_only():
            for _ in range(overlap_batches):
                time.sleep(per)

        def overlapped_wait():
            for _ in range(overlap_batches):
                next(overlap_it)
                time.sleep(per)

        ov = measure([Variant("compute only", compute_only), Variant("ours + compute", overlapped),
                      Variant("wait only", wait_only), Variant("ours + wait", overlapped_wait)],
                     repeats=repeats, warmup=1, min_sample_s=0.0)
        ov_t = {r.name: r.median for r in ov}
        wait_slowdown = ov_t["ours + wait"] / ov_t["wait only"]
        overlap_it.close()
        torch.set_num_threads(torch_threads)
        if pinned:
            os.sched_setaffinity(0, cpus)
        slowdown = ov_t["ours + compute"] / ov_t["compute only"]
        print(f"\noverlap (1 torch thread + 1 loader thread{', pinned to separate cores' if pinned else ''}): "
              f"{overlap_batches} batches, matmul {BATCH}x{FEATURES} @ {FEATURES}x{width} "
              f"({per * 1e3:.2f} ms vs {load_s * 1e3:.2f} ms to load a batch)")
        print(f"  compute only {ov_t['compute only']:.3f} s   ours + compute {ov_t['ours + compute']:.3f} s   "
              f"slowdown {slowdown:.3f}x")
        print(f"  wait only    {ov_t['wait only']:.3f} s   ours + wait    {ov_t['ours + wait']:.3f} s   "
              f"slowdown {wait_slowdown:.3f}x  (sleep per batch: a GPU-bound step, no core used)")

        best_row = max(rate["DataLoader/row w0"], rate["DataLoader/row w2"])
        targets = [
            Target("ours / best per-row DataLoader (w0, w2)", rate["ours"] / best_row, 10.0),
            Target("ours / numpy gather", rate["ours"] / rate["numpy gather"], 0.8),
            Target("compute only / (ours + compute)", 1.0 / slowdown, 1 / 1.15,
                   note=f"overlapped epoch {slowdown:.3f}x compute only; need <= 1.15x"),
            Target("wait only / (ours + wait)", 1.0 / wait_slowdown, None,
                   note=f"overlapped epoch {wait_slowdown:.3f}x a fixed per-batch wait"),
            Target("ours / DataLoader batched __getitems__", rate["ours"] / rate["DataLoader/batch w0"], None),
        ]
        gpu = gpu_case(x, y, args.quick, repeats) if torch.cuda.is_available() else None
        if gpu is not None:
            targets.append(Target("GPU epoch: DataLoader(pin, w4) / ours", gpu["speedup"], 1.3))
        else:
            print("\nGPU case: skipped (no CUDA device)")
        print("\ntargets (the box is shared: ratios are taken in one process, in turns)")
        print(format_targets(targets))
        del ours, overlap_loader, overlap_it, dl_row2, x
        write_json(args.json, dict(
            benchmark="bench_loader", environment=env, rows=rows, batch=BATCH, features=FEATURES,
            loader_threads=args.loader_threads, row_batches=row_n, pin_cores=pinned,
            throughput=[dict(r.to_dict(), samples_per_call=samples[r.name], samples_per_s=rate[r.name])
                        for r in results],
            overlap=dict(batches=overlap_batches, matmul_width=width, results=[r.to_dict() for r in ov],
                         slowdown=slowdown, wait_slowdown=wait_slowdown),
            gpu=gpu, targets=[t.to_dict() for t in targets]))
    return 0 if all(t.passed is not False for t in targets) else 1


def gpu_case(x, y, quick, repeats):
    """A small MLP's epoch on the GPU: ours (device='cuda') vs DataLoader(pin_memory, 4 workers)."""
    dev = torch.device("cuda")
    n_batches = 200 if quick else 977
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1000)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(xb, yb):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), yb).backward()
        opt.step()

    ours = PrefetchLoader((x, y), BATCH, shuffle=True, device=dev, num_threads=4, prefetch=4, epochs=None)
    ours_it = iter(ours)
    dl = torch.utils.data.DataLoader(RowDataset(x, y), batch_size=BATCH, shuffle=True, num_workers=4,
                                     pin_memory=True, persistent_workers=True)

    def run_ours():
        for _ in range(n_batches):
            step(*next(ours_it))
        torch.cuda.synchronize()

    def run_dl():
        for i, (xb, yb) in enumerate(dl):
            step(xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True))
            if i + 1 >= n_batches:
                break
        torch.cuda.synchronize()

    res = measure([Variant("ours cuda", run_ours), Variant("DataLoader pin w4", run_dl)],
                  repeats=repeats, warmup=1, min_sample_s=0.0)
    t = {r.name: r.median for r in res}
    print(f"\nGPU: {n_batches} steps of a small MLP: ours {t['ours cuda']:.3f} s, "
          f"DataLoader(pin_memory, 4 workers) {t['DataLoader pin w4']:.3f} s")
    ours_it.close()
    return dict(batches=n_batches, results=[r.to_dict() for r in res],
                speedup=t["DataLoader pin w4"] / t["ours cuda"])


if __name__ == "__main__":
    sys.exit(main())
