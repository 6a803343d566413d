"""pytest configuration of bench/: microbenchmarks are smoke tests unless a timing run is asked for.

``python -m pytest`` (and ``pytest bench``) runs every test of bench/test_micro.py once, with
pytest-benchmark's timing disabled, as a test that our kernel gives the baseline's result. Any option
that only makes sense for a timing run (``--benchmark-only``, ``--benchmark-enable``,
``--benchmark-json``, ``--benchmark-save``, ``--benchmark-autosave``, ``--benchmark-compare``,
``--benchmark-histogram``) turns the timing on. This is done here rather than with
``--benchmark-disable`` in pytest's addopts because pytest-benchmark refuses ``--benchmark-only``
together with ``--benchmark-disable``: ``pytest bench --benchmark-only`` would be a usage error.
"""
from __future__ import annotations

import pytest

# Options whose presence means "time the benchmarks" (pytest-benchmark's option dests).
_TIMING_OPTIONS = ("benchmark_only", "benchmark_enable", "benchmark_json", "benchmark_save", "benchmark_autosave",
                   "benchmark_compare", "benchmark_histogram")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark reads the option in its own pytest_configure, which runs last (trylast).
    if not config.pluginmanager.hasplugin("benchmark"):
        return
    if not any(config.getoption(name, None) for name in _TIMING_OPTIONS):
        config.option.benchmark_disable = True
