"""The hand-off between PrefetchLoader's gather threads and the consumer: how often a thread sleeps
and who wakes it.

A gather thread that has filled the prefetch depth sleeps until the consumer has taken half of it.
Waking a sleeping thread is a system call (futex) and, on a virtual machine, an interrupt to the idle
core: tens of microseconds paid on the consumer's core. So (1) a thread is woken only when there is
work for it, not for every batch buffer released, and (2) while the consumer takes batches at a
steady pace the thread sleeps with a deadline derived from that pace and wakes by itself, so the
consumer's takes wake nobody. (2) is counted with strace: the futex wake-ups issued by the
consumer's thread that found a sleeper. Batches are compared element by element with the source.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from trainpatterns import PrefetchLoader


def _sleeps(exclude: set) -> int:
    """Voluntary context switches (blocking waits) of this process's threads not in ``exclude``."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) not in exclude:
            try:
                with open(f"/proc/self/task/{tid}/status") as f:
                    total += int(f.read().split("\nvoluntary_ctxt_switches:")[1].split()[0])
            except (FileNotFoundError, ProcessLookupError):  # a thread that ended while listed
                pass
    return total


def test_gather_threads_sleep_once_per_half_prefetch_depth():
    """One sleep per prefetch / 2 batches; waking the thread for every batch released (no work for
    it yet, so it slept again at once) doubled that."""
    x = np.random.default_rng(0).standard_normal((20000, 64)).astype(np.float32)
    before = {int(t) for t in os.listdir("/proc/self/task")}
    loader = PrefetchLoader(x, 64, shuffle=True, seed=1, prefetch=4, num_threads=1, epochs=None)
    order = np.random.Generator(np.random.PCG64([1, 0])).permutation(len(x))
    it = iter(loader)
    next(it)
    time.sleep(0.05)
    s0 = _sleeps(before)
    batches = 200
    for k in range(1, batches + 1):
        b = next(it)
        np.testing.assert_array_equal(b.numpy(), x[order[k * 64:(k + 1) * 64]])
        time.sleep(0.0005)  # the consumer's step: the thread is asleep when the batch is released
    per_batch = (_sleeps(before) - s0) / batches
    it.close()
    assert per_batch < 0.8, f"{per_batch:.2f} sleeps per batch (one per 2 expected)"


_CONSUMER = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    from trainpatterns import PrefetchLoader
    x = np.random.default_rng(0).standard_normal((20000, 64)).astype(np.float32)
    order = np.random.Generator(np.random.PCG64([2, 0])).permutation(len(x))
    it = iter(PrefetchLoader(x, 64, shuffle=True, seed=2, prefetch=4, num_threads=1, epochs=None))
    for k in range(300):
        b = next(it)
        assert (b.numpy() == x[order[k * 64:(k + 1) * 64]]).all()
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:  # the consumer's step, on its own core
            pass
    print("consumer", threading.get_native_id(), flush=True)
    it.close()
""")


@pytest.mark.skipif(shutil.which("strace") is None or not sys.platform.startswith("linux"), reason="needs strace")
def test_a_steady_consumer_wakes_no_gather_thread(tmp_path):
    log = tmp_path / "futex.log"
    res = subprocess.run(["strace", "-f", "-qq", "-e", "trace=futex", "-o", str(log), sys.executable, "-c",
                          _CONSUMER], capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "ptrace" in res.stderr:
        pytest.skip(f"strace cannot trace here: {res.stderr.strip()[:200]}")
    assert res.returncode == 0, res.stderr[-3000:]
    consumer = res.stdout.split("consumer")[1].split()[0]
    # `TID futex(ADDR, FUTEX_WAKE_PRIVATE, N) = k`: k threads woken by that call.
    wakes = [line for line in log.read_text().splitlines()
             if line.startswith(consumer + " ") and "FUTEX_WAKE" in line and not line.rstrip().endswith("= 0")]
    # Without pacing: one per 2 batches (about 150); with it, only the start-up and the odd late
    # thread on a busy machine.
    assert len(wakes) < 60, f"the consumer woke a thread {len(wakes)} times in 300 batches"
