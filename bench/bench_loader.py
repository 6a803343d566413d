"""Benchmark: PrefetchLoader vs torch DataLoader and a plain numpy gather over one shuffled epoch, the
first batch of an epoch, and an epoch overlapped with compute.

Data: an ``np.memmap`` of 1M rows x 256 float32 features (1 GiB, in a temporary directory deleted
afterwards; ``--quick``: 100k rows) plus int64 labels in memory, batch 1024, shuffled.

Throughput, measured in turns in one process (bench/_common.py):
  ours              PrefetchLoader((features, labels), 1024, shuffle=True): one epoch
  numpy gather      features[idx], labels[idx] per batch in a Python loop: the in-process ceiling
  DataLoader/row    a per-row Dataset (``__getitem__``), num_workers 0 and 2 (persistent workers);
                    slow, so timed over the first ``--row-batches`` batches of an epoch
  DataLoader/batch  a Dataset with batched ``__getitems__`` (one fancy index per batch), 0 workers

First batch (from ``iter()``, over the whole memmap opened afresh each time, as a new process would):
  epoch 2           the third pass of ``for epoch in range(3): for batch in loader``
  fresh, built 0.1 s before   a new loader whose ``iter()`` comes 0.1 s after its construction (the
                    model is built in between): its permutation is drawn in the background meanwhile
  fresh, iter() at once       ``iter()`` right after construction: numpy's Fisher-Yates shuffle settles
                    position 0 last, so even the first batch waits for the whole draw; its target is
                    the draw (``permutation(rows)``, timed here) + 2 ms
  endless boundary  ``next()`` across an epoch boundary with ``epochs=None`` (context)

Overlap (400k rows of the memmap; ``--quick``: at most 100k): a consumer running a matmul per batch
(one torch thread), sized to take about as long as gathering a batch on one thread, fed by the
loader (one gather thread, every page mapped by an epoch before) vs the same matmuls on one loaded
batch (compute only). This needs the second core free: on a loaded box it measures the box. Beside
the ratio, where the consumer's time goes, from its thread's CPU time: the matmul on hot data, the
matmul on the batches delivered (gathered by the other core: their lines come from its cache or from
memory), the hand-off (``next()``), and the time it was not running (waiting or preempted). The
floor: that matmul on a batch another core has just gathered with plain torch (a helper thread, no
loader) over it on hot data; no loader gathering on the other core can beat it. Context: a consumer
that sleeps that long per batch (a GPU-bound step as the host sees it).

Targets (CPU): ours >= 10x the best per-row DataLoader; >= 0.8x the numpy gather; first batch of a
new epoch <= 2 ms (at 1M rows); the overlapped epoch <= 1.05x compute only. On a GPU also: a small
model's epoch with ours on cuda vs DataLoader(pin_memory=True, num_workers=4) + .to(device).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
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
FIRST_BATCH_S = 2e-3  # target: a new epoch's first batch within 2 ms


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
    return open_memmap(path, rows)


def open_memmap(path: str, rows: int) -> np.memmap:
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


def throughput_case(x, y, rows, threads, row_batches, repeats):
    """One shuffled epoch: ours, the numpy gather and the DataLoaders; returns samples/s by name."""
    n_batches = -(-rows // BATCH)
    ours = PrefetchLoader((x, y), BATCH, shuffle=True, seed=0, num_threads=threads, prefetch=4)
    epoch_counter = [0]

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
    ours.close()
    return rate, dict(row_batches=row_n, results=[dict(r.to_dict(), samples_per_call=samples[r.name],
                                                         samples_per_s=rate[r.name]) for r in results])


def first_batch_case(path, rows, y, threads, repeats):
    """Seconds from iter() to the first batch: epoch 2 of a loop, fresh loaders, endless mode."""
    def loader(seed, **kw):
        return PrefetchLoader((open_memmap(path, rows), y), BATCH, shuffle=True, seed=seed,
                              num_threads=threads, prefetch=4, **kw)

    def first(ld):
        t0 = time.perf_counter()
        it = iter(ld)
        next(it)
        return time.perf_counter() - t0, it

    t = {"draw": [], "epoch 1": [], "epoch 2": [], "fresh, built 0.1 s before": [], "fresh, iter() at once": [],
         "endless boundary": []}
    for r in range(repeats):
        t0 = time.perf_counter()
        epoch_order(rows, 1000 + r, 0, True)
        t["draw"].append(time.perf_counter() - t0)
        dt, it = first(loader(2000 + r))
        it.close()
        t["fresh, iter() at once"].append(dt)
        ld = loader(3000 + r)
        time.sleep(0.1)
        dt, it = first(ld)
        it.close()
        t["fresh, built 0.1 s before"].append(dt)
        ld = loader(4000 + r)
        for epoch in range(3):
            dt, it = first(ld)
            if epoch:
                t[f"epoch {epoch}"].append(dt)
            for _ in it:
                pass
    ld = loader(5000, epochs=None)
    it = iter(ld)
    for k in range(1, 3 * len(ld)):
        t0 = time.perf_counter()
        next(it)
        if k % len(ld) == 0:
            t["endless boundary"].append(time.perf_counter() - t0)
    it.close()
    med = {k: statistics.median(v) for k, v in t.items()}
    print(f"\nfirst batch ({rows} rows, fresh np.memmap each time; medians of {repeats}): "
          f"numpy permutation({rows}) {med['draw'] * 1e3:.2f} ms")
    for k in t:
        if k != "draw":
            print(f"  {k:<26} {med[k] * 1e3:7.2f} ms   (all: {', '.join(f'{v * 1e3:.2f}' for v in t[k])})")
    return med, t


def overlap_case(path, rows, quick, repeats, prefetch=4):
    """One epoch of a compute-bound consumer fed by one gather thread, against compute only."""
    n = min(rows, 100_000 if quick else 400_000)
    x = np.memmap(path, dtype=np.float32, mode="r+", shape=(n, FEATURES))  # r+: torch.from_numpy below
    y = np.zeros(n, dtype=np.int64)
    nb = -(-n // BATCH)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores in all: one for the consumer's matmul, one for the gather
    order = epoch_order(n, 0, 0, True)

    def gather_epoch():
        t0 = time.perf_counter()
        for s in range(0, n, BATCH):
            x[order[s:s + BATCH]]
        return (time.perf_counter() - t0) / nb

    gather_epoch()  # maps the pages, as the loader's warm-up epoch does below
    load_s = statistics.median(gather_epoch() for _ in range(3))  # one batch's gather on one thread
    xb0 = torch.from_numpy(x[:BATCH].copy())

    def time_mm(w):  # medians: a busy moment must not pick the size
        for _ in range(3):
            torch.mm(xb0, w)
        samples = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(10):
                torch.mm(xb0, w)
            samples.append((time.perf_counter() - t0) / 10)
        return statistics.median(samples)

    width = 8
    while True:  # grow the matmul until it takes about one batch's load time
        w = torch.randn(FEATURES, width)
        per = time_mm(w)
        if per >= load_s or width >= 1 << 16:
            break
        width *= 2
    loader = PrefetchLoader((x, y), BATCH, shuffle=True, seed=0, num_threads=1, prefetch=prefetch, epochs=None)
    it = iter(loader)
    for _ in range(nb):  # an epoch first: the threads' pages are mapped, as from epoch 2 on
        next(it)

    def compute_only():
        for _ in range(nb):
            torch.mm(xb0, w)

    def overlapped():
        for _ in range(nb):
            xb, _ = next(it)
            torch.mm(xb, w)

    def wait_only():  # a step that waits without using a core: a GPU-bound step as the host sees it
        for _ in range(nb):
            time.sleep(per)

    def overlapped_wait():
        for _ in range(nb):
            next(it)
            time.sleep(per)

    res = measure([Variant("compute only", compute_only), Variant("ours + compute", overlapped),
                   Variant("wait only", wait_only), Variant("ours + wait", overlapped_wait)],
                  repeats=repeats, warmup=1, min_sample_s=0.0)
    med = {r.name: r.median for r in res}
    split = consumer_split(it, xb0, w, nb)
    it.close()
    floor = other_core_floor(x, order, xb0, w)
    torch.set_num_threads(torch_threads)
    slowdown = med["ours + compute"] / med["compute only"]
    wait_slowdown = med["ours + wait"] / med["wait only"]
    us = {k: v * 1e6 for k, v in split.items()}
    print(f"\noverlap ({n} rows; 1 torch thread + 1 loader thread): {nb} batches, matmul {BATCH}x{FEATURES} @ "
          f"{FEATURES}x{width} ({per * 1e3:.2f} ms vs {load_s * 1e3:.2f} ms to gather a batch)")
    print(f"  compute only {med['compute only']:.3f} s   ours + compute {med['ours + compute']:.3f} s   "
          f"{slowdown:.3f}x (target <= 1.05x)")
    print(f"  floor: the matmul on a batch another core has just gathered (plain torch on a helper thread, no "
          f"loader) takes {floor:.3f}x its time on hot data; no loader gathering on the other core can do better")
    print(f"  consumer per batch (thread CPU time, one more epoch): matmul on hot data {us['hot']:.0f} us, on the "
          f"delivered batch {us['delivered']:.0f} us (+{us['delivered'] - us['hot']:.0f}), next() {us['hand-off']:.1f} us,"
          f" not running (waiting or preempted) {us['not running']:.0f} us")
    print(f"  wait only    {med['wait only']:.3f} s   ours + wait    {med['ours + wait']:.3f} s   "
          f"{wait_slowdown:.3f}x  (sleep per batch: a GPU-bound step, no core used)")
    return dict(rows=n, batches=nb, matmul_width=width, prefetch=prefetch, results=[r.to_dict() for r in res],
                slowdown=slowdown, wait_slowdown=wait_slowdown, consumer_split_s=split, floor=floor)


def other_core_floor(x, order, xb0, w):
    """The median matmul CPU time on batches another core has just gathered over the same on hot data:
    what reading a freshly gathered batch costs the consumer, whoever gathers it. A helper thread
    gathers with torch.index_select (which releases the GIL) into 4 buffers taken in turn; only the
    matmuls are timed, not the hand-off."""
    src, idx = torch.from_numpy(x), torch.from_numpy(order)
    batches = len(order) // BATCH
    bufs = [torch.empty(BATCH, x.shape[1]) for _ in range(4)]
    free, full = threading.Semaphore(len(bufs) - 1), threading.Semaphore(0)

    def produce():
        for k in range(batches):
            free.acquire()
            torch.index_select(src, 0, idx[k * BATCH:(k + 1) * BATCH], out=bufs[k % len(bufs)])
            full.release()

    helper = threading.Thread(target=produce)
    helper.start()
    fresh, hot, cpu = [], [], time.thread_time  # CPU time: a busy box's preemptions do not count
    for k in range(batches):
        full.acquire()
        t0 = cpu()
        torch.mm(bufs[k % len(bufs)], w)
        fresh.append(cpu() - t0)
        free.release()
    helper.join()
    for _ in range(batches):
        t0 = cpu()
        torch.mm(xb0, w)
        hot.append(cpu() - t0)
    return statistics.median(fresh) / statistics.median(hot)


def consumer_split(it, xb0, w, nb):
    """Per batch, the consumer thread's CPU time in a matmul on hot data, in a matmul on the batch
    the loader delivered, and in next(); and the wall time it was not running."""
    cpu = time.thread_time
    t0 = cpu()
    for _ in range(nb):
        torch.mm(xb0, w)
    hot = (cpu() - t0) / nb
    handoff = delivered = 0.0
    wall0 = time.perf_counter()
    for _ in range(nb):
        a = cpu()
        xb, _ = next(it)
        b = cpu()
        torch.mm(xb, w)
        delivered += cpu() - b
        handoff += b - a
    wall = time.perf_counter() - wall0
    return dict(hot=hot, delivered=delivered / nb, **{"hand-off": handoff / nb,
                                                        "not running": (wall - delivered - handoff) / nb})


def main() -> int:
    p = common_parser(__doc__)
    p.add_argument("--rows", type=int, default=None, help="rows in the memmap (default 1M, --quick 100k)")
    p.add_argument("--loader-threads", type=int, default=2, help="PrefetchLoader num_threads (default 2)")
    p.add_argument("--row-batches", type=int, default=None,
                   help="batches timed for the per-row DataLoaders (default 200, --quick 40)")
    args = p.parse_args()
    apply_threads(args.threads)
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    row_batches = args.row_batches or (40 if args.quick else 200)
    repeats = 3 if args.quick else 5
    env = environment()
    print(f"bench_loader: {rows} rows x {FEATURES} float32 (memmap) + int64 labels, batch {BATCH}, shuffled; "
          f"torch threads {env['threads']}, cpus {env['cpus']}, {env['cpu']}; load average "
          f"{os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory(prefix="tp_bench_loader_") as tmp:
        path = os.path.join(tmp, "features.f32")
        x = make_memmap(path, rows)
        y = np.random.default_rng(1).integers(0, 1000, rows).astype(np.int64)
        rate, throughput = throughput_case(x, y, rows, args.loader_threads, row_batches, repeats)
        first, first_all = first_batch_case(path, rows, y, args.loader_threads, repeats)
        overlap = overlap_case(path, rows, args.quick, repeats)
        best_row = max(rate["DataLoader/row w0"], rate["DataLoader/row w2"])
        ms = {k: v * 1e3 for k, v in first.items()}
        targets = [
            Target("ours / best per-row DataLoader (w0, w2)", rate["ours"] / best_row, 10.0),
            Target("ours / numpy gather", rate["ours"] / rate["numpy gather"], 0.8),
            Target("first batch of epoch 2: 2 ms / time", FIRST_BATCH_S / first["epoch 2"], 1.0,
                   note=f"{ms['epoch 2']:.2f} ms; need <= 2 ms"),
            Target("first batch, fresh loader built 0.1 s before iter(): 2 ms / time",
                   FIRST_BATCH_S / first["fresh, built 0.1 s before"], 1.0,
                   note=f"{ms['fresh, built 0.1 s before']:.2f} ms; need <= 2 ms"),
            Target("first batch, fresh loader, iter() at once: (draw + 2 ms) / time",
                   (first["draw"] + FIRST_BATCH_S) / first["fresh, iter() at once"], 1.0,
                   note=f"{ms['fresh, iter() at once']:.2f} ms; need <= the {ms['draw']:.2f} ms draw + 2 ms"),
            Target("compute only / (ours + compute)", 1.0 / overlap["slowdown"], 1 / 1.05,
                   note=f"overlapped epoch {overlap['slowdown']:.3f}x compute only; need <= 1.05x"),
            Target("compute only / other-core floor", 1.0 / overlap["floor"], None,
                   note=f"a matmul on a batch another core has just gathered: {overlap['floor']:.3f}x on hot data"),
            Target("wait only / (ours + wait)", 1.0 / overlap["wait_slowdown"], None,
                   note=f"overlapped epoch {overlap['wait_slowdown']:.3f}x a fixed per-batch wait"),
            Target("ours / DataLoader batched __getitems__", rate["ours"] / rate["DataLoader/batch w0"], None),
        ]
        gpu = gpu_case(x, y, args.quick, repeats) if torch.cuda.is_available() else None
        if gpu is not None:
            targets.append(Target("GPU epoch: DataLoader(pin, w4) / ours", gpu["speedup"], 1.3))
        else:
            print("\nGPU case: skipped (no CUDA device)")
        print(f"\ntargets (the box is shared: ratios are taken in one process, in turns; load average "
              f"{os.getloadavg()[0]:.2f})")
        print(format_targets(targets))
        del x
        write_json(args.json, dict(
            benchmark="bench_loader", environment=env, rows=rows, batch=BATCH, features=FEATURES,
            loader_threads=args.loader_threads, throughput=throughput,
            first_batch=dict(median_s=first, all_s=first_all), overlap=overlap, gpu=gpu,
            targets=[t.to_dict() for t in targets]))
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
