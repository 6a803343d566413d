"""Pictures of how cost grows: the benchmarks' sweeps drawn as log-log PNGs under bench/plots/.

Why: a ratio at one size hides where each tool wins. Each benchmark script that measures a sweep
(ours and the baselines at several sizes, in turns) writes it into its ``--json`` output under
``"sweeps"``; this script draws every sweep it finds, one PNG each:

    {"sweeps": [{"name": "optim_step_vs_params",            # the PNG's file name
                 "title": "AdamW step time against parameter count",
                 "x": "parameters", "y": "seconds per step",
                 "series": {"ours": [[1e3, 2e-6], ...], "torch fused": [[1e3, 9e-6], ...]}}]}

Run the scripts with --json, then:
    python bench/plots.py out/*.json [--out bench/plots]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["draw", "sweeps_of"]


def sweeps_of(paths: list) -> list:
    """Every sweep in the JSON files ``paths`` (a file without sweeps adds none)."""
    found = []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        for sweep in doc.get("sweeps", []):
            if not sweep.get("series"):
                raise ValueError(f"{path}: sweep {sweep.get('name')!r} has no series")
            found.append(sweep)
    return found


def draw(sweep: dict, out_dir: str) -> str:
    """One log-log PNG of ``sweep``; its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used through matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        for label, points in sweep["series"].items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        xs_all = sorted({x for points in sweep["series"].values() for x, _ in points})
        if xs_all[-1] < 100 * xs_all[0]:  # a short range (threads): label the sizes measured, plainly
            ax.set_xticks(xs_all)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(sweep.get("x", "size"))
        ax.set_ylabel(sweep.get("y", "seconds"))
        ax.set_title(sweep.get("title", sweep["name"]))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{sweep['name']}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        return path
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", nargs="+", help="--json outputs of the benchmark scripts")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots"))
    args = p.parse_args(argv)
    sweeps = sweeps_of(args.json)
    if not sweeps:
        print("no sweeps in the files given (run the scripts that measure them with --json)", file=sys.stderr)
        return 1
    for sweep in sweeps:
        print(draw(sweep, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
