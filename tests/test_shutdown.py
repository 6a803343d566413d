"""The end of a distributed job: ``trainpatterns.distributed.shutdown()`` leaves no gloo worker
thread behind to race the interpreter's exit, even when torch itself holds the default group.

torch.distributed.nn.functional binds ``group.WORLD`` into its functions' defaults when first
imported; torch._dynamo imports it. A group pinned that way survives destroy_process_group(), and
its worker threads, still dropping their last collectives' tensors, abort the process at exit in a
few runs of a hundred. The reference is torch's own count of its threads: none must be left.
"""
from __future__ import annotations

import os
import textwrap

import pytest
import torch

from _ranks import run_ranks

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")

WORKER = textwrap.dedent('''
    import os, sys
    import torch
    import torch.distributed as dist
    order, rank, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if order == "library-first":
        import trainpatterns.distributed as tpd
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    import torch._dynamo  # imports torch.distributed.nn.functional while the group exists
    if order == "library-after":
        import trainpatterns.distributed as tpd
    box = [None, None]
    dist.all_gather_object(box, {"rank": rank})
    assert box == [{"rank": 0}, {"rank": 1}], box
    if order == "plain-destroy":
        dist.destroy_process_group()
    else:
        tpd.shutdown()
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended while listed
            pass
    print("gloo threads left:", names.count("pt_gloo_runloop"), flush=True)
''')


@pytest.mark.parametrize("order", ["library-first", "library-after"])
def test_shutdown_joins_the_gloo_threads_even_when_torch_pinned_the_group(tmp_path, order):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    for code, out, err in run_ranks([str(script), order, "{rank}", "{port}"], world=2, timeout_s=120,
                                    torchrun_env=False):
        assert code == 0, err
        assert "gloo threads left: 0" in out, out + err


def test_importing_the_library_first_keeps_torch_from_pinning_the_group(tmp_path):
    # A plain destroy_process_group(), no shutdown(): the library, imported before the group, made
    # torch.distributed.nn.functional bind None, so destroying the group joins its threads.
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("order == \"library-first\"", "order in (\"library-first\", \"plain-destroy\")"))
    for code, out, err in run_ranks([str(script), "plain-destroy", "{rank}", "{port}"], world=2, timeout_s=120,
                                    torchrun_env=False):
        assert code == 0, err
        assert "gloo threads left: 0" in out, out + err


def test_shutdown_without_a_process_group_is_a_no_op():
    # One process (nothing initialised): the job's end is the same call as under torchrun.
    from trainpatterns.distributed import shutdown

    assert not torch.distributed.is_initialized()
    shutdown()
    assert not torch.distributed.is_initialized()
