"""Every benchmark under bench/ runs once in its quickest mode against the installed package, as a
new user would run it after the README's install, and prints its table of targets.

These check that the scripts work, not the speed: a target may print FAIL on a busy test machine.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _ranks import run_ranks

BENCH = Path(__file__).resolve().parent.parent / "bench"

# The quickest mode of each single-process script; {tmp} is the test's temporary directory.
SINGLE = {
    "bench_optim.py": ["--quick", "--cases", "a,b,c,d,e"],
    "bench_loader.py": ["--quick", "--rows", "20000", "--row-batches", "5"],
    "bench_checkpoint.py": ["--quick", "--dir", "{tmp}"],
    "bench_transfer.py": ["--quick"],
    "bench_async.py": ["--quick"],  # starts its own rank processes, one job at a time
    "bench_store.py": ["--quick", "--rows", "5000"],
}
SLOW = {
    # Optuna in the same process and 3 seeds of two test functions: minutes, not seconds.
    "bench_tuning.py": ["--quick", "--seeds", "1"],
}
# The sweeps: each tool's series at every size, for bench/plots.py (tuning needs Optuna: slow).
SWEEPS = {"optim,loader,checkpoint": ["optim_step_vs_params", "loader_samples_vs_threads", "checkpoint_stall_vs_state"],
          "tuning": ["tuning_suggestion_vs_trials"]}
DISTRIBUTED = {"bench_allreduce.py": ["--quick", "--repeats", "2"],
               "bench_pipeline.py": ["--quick", "--rounds", "1", "--width", "128", "--batch", "64"]}


def test_every_benchmark_is_covered():
    scripts = {p.name for p in BENCH.glob("bench_*.py")}
    assert scripts == set(SINGLE) | set(SLOW) | set(DISTRIBUTED) | {"bench_sweeps.py"}


def check_output(name: str, code, out: str, err: str, json_path: Path) -> None:
    # Exit code 1 is a script's verdict that a speed target printed FAIL; anything else is a crash.
    assert code == 0 or (code == 1 and "FAIL" in out), f"{name} failed:\n{out[-2000:]}\n{err[-4000:]}"
    assert "target" in out, f"{name} printed no targets:\n{out[-2000:]}"
    assert json.loads(json_path.read_text()), f"{name} wrote an empty --json file"


def run_single(name: str, args: list, tmp_path: Path) -> None:
    out_json = tmp_path / "out.json"
    argv = [a.format(tmp=tmp_path) for a in args] + ["--json", str(out_json)]
    res = subprocess.run([sys.executable, str(BENCH / name), *argv], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    check_output(name, res.returncode, res.stdout, res.stderr, out_json)


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_benchmark_runs(name, tmp_path):
    run_single(name, SINGLE[name], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_slow_benchmark_runs(name, tmp_path):
    pytest.importorskip("optuna")
    run_single(name, SLOW[name], tmp_path)


@pytest.mark.parametrize("name", sorted(DISTRIBUTED))
def test_distributed_benchmark_runs_on_two_ranks(name, tmp_path):
    out_json = tmp_path / "out.json"
    results = run_ranks([str(BENCH / name), *DISTRIBUTED[name], "--json", str(out_json)], world=2, timeout_s=600,
                        cwd=str(tmp_path))
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank} of {name} failed:\n{out[-2000:]}\n{err[-4000:]}"
    check_output(name, 0, results[0][1], results[0][2], out_json)


def test_plots_draws_every_sweep_it_finds(tmp_path):
    sys.path.insert(0, str(BENCH))
    import plots

    doc = {"sweeps": [{"name": "a", "title": "A", "x": "n", "y": "s",
                       "series": {"ours": [[10, 1e-3], [1000, 2e-3]], "torch": [[10, 4e-3], [1000, 9e-3]]}},
                      {"name": "b", "series": {"ours": [[1, 1.0], [2, 3.0]]}}]}
    (tmp_path / "x.json").write_text(json.dumps(doc))
    (tmp_path / "none.json").write_text(json.dumps({"rows": []}))
    assert plots.main([str(tmp_path / "x.json"), str(tmp_path / "none.json"), "--out", str(tmp_path / "png")]) == 0
    import matplotlib.image as mpimg

    for name in ("a", "b"):
        img = mpimg.imread(tmp_path / "png" / f"{name}.png")
        assert img.shape[0] > 100 and img.std() > 0.01  # drawn, not blank
    assert plots.main([str(tmp_path / "none.json"), "--out", str(tmp_path / "png2")]) == 1
    assert not (tmp_path / "png2").exists()


@pytest.mark.parametrize("parts", [pytest.param(p, marks=pytest.mark.slow) if p == "tuning" else p for p in SWEEPS])
def test_sweeps_give_every_tool_at_every_size_and_plots_draw_them(parts, tmp_path):
    if parts == "tuning":
        pytest.importorskip("optuna")
    out_json = tmp_path / "sweeps.json"
    res = subprocess.run([sys.executable, str(BENCH / "bench_sweeps.py"), "--quick", "--repeats", "1", "--part", parts,
                          "--json", str(out_json)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    sweeps = json.loads(out_json.read_text())["sweeps"]
    assert [s["name"] for s in sweeps] == SWEEPS[parts]
    for s in sweeps:
        sizes = [sorted(x for x, _ in points) for points in s["series"].values()]
        assert len(sizes) >= 2 and len(sizes[0]) >= 2 and all(xs == sizes[0] for xs in sizes), s
        assert all(y > 0 for points in s["series"].values() for _, y in points), s
        assert "ours vs" in res.stdout  # the table with the ratio at each size
    sys.path.insert(0, str(BENCH))
    import plots

    assert plots.main([str(out_json), "--out", str(tmp_path / "png")]) == 0
    assert sorted(p.stem for p in (tmp_path / "png").glob("*.png")) == sorted(SWEEPS[parts])
