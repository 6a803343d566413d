"""The package as a user meets it: build report, the `info` command, the built-in training job."""
from __future__ import annotations

import json
import subprocess
import sys

import trainpatterns as tp


def test_build_info_reports_what_was_compiled():
    info = tp.build_info()
    assert info["simd"] in info["simd_compiled"]
    assert info["simd"] in ("scalar", "avx2", "avx512")
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build must name its architectures"
        assert info["cuda_devices"] >= 0  # 0 on a machine without a driver: the import still works
    assert info["version"] == tp.__version__


def test_info_command_prints_build_report():
    out = subprocess.run([sys.executable, "-m", "trainpatterns", "info", "--json"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    info = json.loads(out)
    assert info["simd"] == tp.build_info()["simd"]
    text = subprocess.run([sys.executable, "-m", "trainpatterns", "info"], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    assert "CUDA kernels" in text and "CPU SIMD" in text and "OpenMP" in text


def test_builtin_training_job_interpolates_to_its_target(tmp_path):
    # The README's command as it is: the loss falls, and the L-BFGS finish brings the max error over
    # the whole training set to 5e-3 or below (its time is reported by the command, not tested here).
    res = subprocess.run([sys.executable, "-m", "trainpatterns", "train", "--no-progress"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("epoch ")]
    losses = [float(line.split("train_loss ")[1].split()[0]) for line in lines]
    assert len(losses) == 11 and losses[-1] < 0.05 * losses[0], losses
    assert "L-BFGS finish" in res.stdout
    assert float(lines[-1].split("max_error ")[1].split()[0]) <= 5e-3, lines[-1]


def test_bad_command_line_is_a_clear_error():
    res = subprocess.run([sys.executable, "-m", "trainpatterns", "no-such-command"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    assert "invalid choice" in res.stderr
