"""How cost grows with size: ours against the baseline at several sizes, for the pictures.

Why: a ratio at one size hides where each tool wins. Each part measures ours and the baselines at
every size in turns (``_common.measure``), prints a table with the ratio at each size, and writes
its series into ``--json`` under ``"sweeps"``, which ``bench/plots.py`` draws as log-log PNGs.

Parts (``--part``, default all; ``--quick`` keeps the smaller sizes):
  optim       AdamW step time against parameter count, 1K to 100M fp32 parameters in tensors of at
              most 1M elements, persistent gradients: FusedAdamW against torch's fused AdamW.
  loader      shuffled-epoch samples/s against threads over a 200k x 256 float32 array, batch 1024:
              PrefetchLoader(num_threads=t) against DataLoader(num_workers=t) on per-row indexing
              (its usual use; timed on its first 40 batches) and on whole-batch indexing.
  checkpoint  save stall against state size (AdamW states of 1-8 layers of 2048 x 2048): ours
              async (steady state), torch.save + fsync, DCP async_save, from bench_checkpoint.run.
  tuning      time per suggestion against trials on Hartmann6 (30 to 1000 stored trials): our
              GPSampler against Optuna's, from bench_tuning.scaling.

Run: python bench/bench_sweeps.py [--part all|optim,loader,checkpoint,tuning] [--quick] --json F
then: python bench/plots.py F
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Variant, apply_threads, common_parser, environment, measure, write_json  # noqa: E402

import trainpatterns  # noqa: E402
from trainpatterns import PrefetchLoader  # noqa: E402

PARTS = ("optim", "loader", "checkpoint", "tuning")


def _table(title: str, x_name: str, series: dict, ours: str, rate: bool = False) -> None:
    """Print the series side by side, and how many times better ours is than each baseline at each
    size: baseline time / ours, or for a ``rate`` (higher is better) ours / baseline."""
    names = list(series)
    xs = sorted({x for pts in series.values() for x, _ in pts})
    at = {n: dict(series[n]) for n in names}
    print(f"\n{title}")
    head = f"{x_name:>12}  " + "  ".join(f"{n:>22}" for n in names)
    head += "  " + "  ".join(f"{'ours vs ' + n:>30}" for n in names if n != ours)
    print(head + "\n" + "-" * len(head))
    for x in xs:
        row = f"{x:>12.4g}  " + "  ".join(f"{at[n].get(x, float('nan')):>22.4g}" for n in names)
        ratios = [at[n].get(x, float("nan")) / at[ours].get(x, float("nan")) for n in names if n != ours]
        row += "  " + "  ".join(f"{1 / r if rate else r:>29.2f}x" for r in ratios)
        print(row)


def optim_sweep(quick: bool, repeats: int) -> dict:
    """Seconds per AdamW step against parameter count: ours and torch fused, in turns at each size."""
    sizes = [10 ** k for k in range(3, 8 if quick else 9)]
    series: dict = {"ours FusedAdamW": [], "torch AdamW fused": []}
    for n in sizes:
        chunk = min(n, 1 << 20)
        shapes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])

        def make():
            g = torch.Generator().manual_seed(0)
            ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            return ps
        ours = trainpatterns.FusedAdamW(make(), lr=1e-3)
        theirs = torch.optim.AdamW(make(), lr=1e-3, fused=True)
        res = measure([Variant("ours FusedAdamW", ours.step), Variant("torch AdamW fused", theirs.step)],
                      repeats=repeats, warmup=2, min_sample_s=0.05 if n < 10 ** 7 else 0.0)
        for r in res:
            series[r.name].append([n, r.median])
        del ours, theirs
    _table("AdamW step, seconds", "parameters", series, "ours FusedAdamW")
    return dict(name="optim_step_vs_params", title="AdamW step time against parameter count (persistent grads)",
                x="parameters", y="seconds per step", series=series)


def loader_sweep(quick: bool, repeats: int) -> dict:
    """Samples per second of a shuffled epoch against threads (workers for the DataLoaders)."""
    from bench_loader import BatchedDataset, RowDataset, epoch_fn

    rows, batch, row_batches = (50_000 if quick else 200_000), 1024, 40
    # 4 workers on a 2-core box is the point of the sweep's last size, not a mistake to warn about.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    x = np.random.default_rng(0).standard_normal((rows, 256), dtype=np.float32)
    y = np.arange(rows, dtype=np.int64)
    series: dict = {"ours PrefetchLoader": [], "DataLoader per-row": [], "DataLoader whole-batch": []}
    for t in (1, 2, 4):
        ours = PrefetchLoader((x, y), batch, shuffle=True, seed=0, num_threads=t, prefetch=4)
        per_row = torch.utils.data.DataLoader(RowDataset(x, y), batch_size=batch, shuffle=True, num_workers=t,
                                              persistent_workers=True)
        whole = torch.utils.data.DataLoader(BatchedDataset(x, y), batch_size=batch, shuffle=True, num_workers=t,
                                            persistent_workers=True, collate_fn=lambda b: b)
        counted = {"ours PrefetchLoader": rows, "DataLoader per-row": row_batches * batch,
                   "DataLoader whole-batch": rows}
        res = measure([Variant("ours PrefetchLoader", epoch_fn(lambda: ours)),
                       Variant("DataLoader per-row", epoch_fn(lambda: per_row, row_batches)),
                       Variant("DataLoader whole-batch", epoch_fn(lambda: whole))],
                      repeats=repeats, warmup=1, min_sample_s=0.0)
        for r in res:
            series[r.name].append([t, counted[r.name] / r.median])
        ours.close()
        del per_row, whole
    _table("shuffled epoch, samples/s", "threads", series, "ours PrefetchLoader", rate=True)
    return dict(name="loader_samples_vs_threads", title=f"Shuffled epoch of {rows} x 256 fp32, batch {batch}",
                x="threads (DataLoader: workers)", y="samples per second", series=series)


def checkpoint_sweep(quick: bool, repeats: int) -> dict:
    """Save stall against state bytes: ours async (steady), torch.save + fsync, DCP async_save."""
    import bench_checkpoint as bc

    names = {bc.STEADY: "ours async (steady)", "torch.save+fsync": "torch.save + fsync",
             "dcp async stall": "DCP async_save"}
    series: dict = {v: [] for v in names.values()}
    parent = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    for layers in ((1, 2) if quick else (1, 2, 4, 8)):
        model, opt = bc.make_state(layers)
        nbytes = sum(t.numel() * t.element_size() for t in bc.state_tensors(model, opt))
        root = tempfile.mkdtemp(prefix=".bench-sweep-", dir=parent)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results, _, _, _ = bc.run(root, {"model": model, "optim": opt}, model, opt, nbytes, repeats)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        for r in results:
            if r.name in names:
                series[names[r.name]].append([nbytes, r.median])
        del model, opt
    _table("checkpoint save stall, seconds", "state bytes", series, "ours async (steady)")
    return dict(name="checkpoint_stall_vs_state", title="Checkpoint save stall against state size (AdamW)",
                x="state bytes", y="seconds the training loop waits", series=series)


def tuning_sweep(quick: bool, repeats: int) -> dict:
    """Seconds per suggestion against stored trials: our GPSampler and Optuna's, in turns."""
    import bench_tuning as bt

    if bt.optuna is None:
        raise SystemExit("the tuning sweep needs optuna (pip install optuna)")
    sizes = (30, 100, 300) if quick else (30, 100, 300, 1000)
    samples = bt.scaling(sizes, ["gp", "optuna-gp"], None)
    labels = {"gp": "ours GPSampler", "optuna-gp": "Optuna GPSampler"}
    series: dict = {v: [] for v in labels.values()}
    for (variant, n), s in sorted(samples.items(), key=lambda kv: kv[0][1]):
        series[labels[variant]].append([n, float(np.mean(s))])  # the mean counts our periodic refits
    _table("GP suggestion, seconds (mean)", "trials", series, "ours GPSampler")
    return dict(name="tuning_suggestion_vs_trials", title="GP suggestion time against trials (Hartmann6)",
                x="trials", y="seconds per suggestion (mean)", series=series)


def main() -> int:
    p = common_parser(__doc__)
    p.add_argument("--part", default="all", help=f"all, or a comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--repeats", type=int, default=5, help="rounds in turns at each size (default 5)")
    args = p.parse_args()
    apply_threads(args.threads)
    env = environment()
    print(f"threads {env['threads']}, cpu {env['cpu']}, load average {os.getloadavg()[0]:.2f} at the start")
    parts = PARTS if args.part == "all" else tuple(args.part.split(","))
    if not set(parts) <= set(PARTS):
        p.error(f"--part: unknown {sorted(set(parts) - set(PARTS))}; choose from all, {', '.join(PARTS)}")
    run = {"optim": optim_sweep, "loader": loader_sweep, "checkpoint": checkpoint_sweep, "tuning": tuning_sweep}
    sweeps = [run[part](args.quick, args.repeats) for part in parts]
    write_json(args.json, dict(environment=env, sweeps=sweeps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
