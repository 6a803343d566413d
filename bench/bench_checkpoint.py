"""Checkpoint save stall, save throughput and restore time: ours vs torch.save, DCP and the disk floor.

State: a stack of Linear(2048, 2048) layers plus torch AdamW's two moment buffers, about 1 GB
(--quick: about 200 MB). Every variant writes the same state to a fresh path on the disk that holds
this repository (never tmpfs; the path is printed), with fsync, and old files are deleted outside
the timed region. Variants, timed in turns:

  disk floor           os.write of the same bytes into one file + fsync: what the disk allows
  torch.save+fsync     torch.save of {"model", "optim"} state dicts into a file, then fsync
  ours blocking        CheckpointManager(async_save=False).save(): write, CRC-32, fsync, commit
  ours async, steady   CheckpointManager().save() until it returns (host snapshot only), by one
                       manager that has saved before, as in a training loop from its second save
  ours async, first    the same call by a new manager: its first save allocates its host buffers
  plain copy           Tensor.copy_ of the same tensors into buffers allocated once: what a
                       snapshot costs at best on a quiet machine, and a gauge of how busy the
                       machine is during the run (4-8x slower when another process holds a core)
  dcp async stall      torch.distributed.checkpoint.async_save() until it returns (its staging)
Background writes (ours, DCP's) are awaited outside the timed region, before the next variant.

Why a training loop's stall and one median over async saves can disagree:
- First save against the others. A manager keeps its host buffers across saves. Its first save
  allocates them, and the kernel faults in and zeroes every page as the copy first touches it,
  which costs as much as the copy itself or more: on the 2-vCPU Xeon VM the first save of 200 MB
  stalls 45-57 ms, the later ones 18-20 ms (1 GB: 320-360 ms against 90-100 ms; memory the VM has
  never touched since boot costs more again, 2 s once). The two are reported separately against
  the same torch.save+fsync and the target is the steady state, what a loop pays at every save
  but one. Before each first-save call the previous manager is dropped and freed memory is handed
  back to the OS (malloc_trim), so its buffers are fresh pages as in a new process (the page
  faults per call are printed); the warm-up call takes the VM's first touch.
- A busy core. The stall is a memory copy and the baseline is disk-bound. Tensor.copy_ splits each
  tensor over torch's threads and waits for all of them at every tensor; with another process on
  one of the two cores each wait can last a scheduler time slice, and the 24 tensors of this state
  take 70-150 ms instead of 18, while torch.save+fsync hardly moves: a median of three samples can
  land anywhere from 3x to 14x. The snapshot copies in one pass split over a few threads, one
  wait per save (about 30 ms with one core free), and the plain copy row shows how busy the
  machine was.

Restore (page cache warm for both, as right after a save): ours restore() (read, verify every
checksum, load_state_dict) vs torch.load(weights_only=True) followed by the same load_state_dict
calls; torch.load alone for context. Ours reads each file, never maps it (a mapped tensor dies with
SIGBUS once its file is truncated), as a few contiguous shares on as many threads as torch may use
(at most 4), each piece hashed as it lands; torch.load reads on one thread. Both allocate one
block per tensor, which the allocator recycles from one call to the next.

Targets: async stall, steady state, <= 0.25x torch.save+fsync (the first save is reported beside
it); blocking save >= 0.7x the disk floor's throughput; restore no slower than torch.load (+
load_state_dict).
"""
from __future__ import annotations

import ctypes
import gc
import os
import resource
import shutil
import statistics
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (Target, Variant, apply_threads, common_parser, environment, format_table,  # noqa: E402
                     format_targets, measure, write_json)

from trainpatterns.checkpoint import CheckpointManager  # noqa: E402

STEADY, FIRST = "ours async, steady", "ours async, first"


def make_state(layers: int, width: int = 2048):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # creates exp_avg / exp_avg_sq
    return model, opt


def state_tensors(model, opt) -> list:
    """Every tensor of the model's and the optimizer's state (AdamW's scalar steps aside), in order."""
    out = list(model.state_dict().values())
    for s in opt.state.values():
        out += [t for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    return out


def release_free_memory() -> None:
    """Hand memory the process freed back to the OS (glibc), so the next allocations are fresh pages."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Paths:
    """Fresh output paths under one directory; the previous one is deleted (untimed) before each call."""

    def __init__(self, root: str, name: str):
        self.root, self.name, self.i, self.last = root, name, 0, None

    def next(self) -> str:
        self.clear()  # normally already done, untimed, by the variant's setup
        self.i += 1
        self.last = os.path.join(self.root, f"{self.name}-{self.i}")
        return self.last

    def clear(self) -> None:
        if self.last and os.path.exists(self.last):
            if os.path.isdir(self.last):
                shutil.rmtree(self.last)
            else:
                os.remove(self.last)


def main() -> None:
    p = common_parser(__doc__)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir beside this repository)")
    args = p.parse_args()
    apply_threads(args.threads)
    layers = 4 if args.quick else 20
    repeats = 5  # rounds in turns: each save figure is a median of 5 calls, each restore figure of 11
    root_parent = args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    root = tempfile.mkdtemp(prefix=".bench-checkpoint-", dir=root_parent)
    fs = os.statvfs(root)
    model, opt = make_state(layers)
    nbytes = sum(t.numel() * t.element_size() for t in state_tensors(model, opt))
    if fs.f_bavail * fs.f_frsize < 4 * nbytes:
        raise SystemExit(f"{root}: not enough free space for a {nbytes / 1e9:.2f} GB benchmark")
    state = {"model": model, "optim": opt}
    env = environment()
    print(f"state: {nbytes / 1e9:.3f} GB in {len(model.state_dict()) * 3} tensors; writing to {root}")
    print(f"threads {env['threads']}, cpu {env['cpu']}, load average {os.getloadavg()[0]:.2f} at the start")
    try:
        results, restore_results, dcp_note, faults = run(root, state, model, opt, nbytes, repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    by = {r.name: r for r in results}
    print(format_table("save (stall of the training thread)", results, baseline="torch.save+fsync", probe="disk floor"))
    print()
    rby = {r.name: r for r in restore_results}
    print(format_table("restore", restore_results, baseline="torch.load+apply"))
    base = by["torch.save+fsync"].median
    pages = nbytes / resource.getpagesize()
    targets = [
        Target("torch.save+fsync time / ours async stall, steady state", base / by[STEADY].median, 4.0,
               "stall <= 0.25x, every save of a loop but the first"),
        Target("torch.save+fsync time / ours async stall, first save", base / by[FIRST].median, None,
               f"fresh host buffers: {faults[FIRST] / pages:.2f} page faults per page of state, "
               f"steady state {faults[STEADY] / pages:.2f}"),
        Target("plain copy / ours async stall, steady state", by["plain copy"].median / by[STEADY].median, None,
               "1 = the snapshot costs a plain copy of the same bytes"),
        Target("ours blocking throughput / disk floor throughput", by["disk floor"].median / by["ours blocking"].median,
               0.7),
        Target("torch.load+apply time / ours restore time", rby["torch.load+apply"].median / rby["ours restore"].median,
               1.0, "restore no slower; ours also verifies every checksum"),
        Target("torch.load alone / ours restore (incl. apply)", rby["torch.load"].median / rby["ours restore"].median,
               None),
    ]
    if "dcp async stall" in by:
        targets.append(Target("dcp async stall / ours async stall, steady state",
                              by["dcp async stall"].median / by[STEADY].median, None))
    if dcp_note:
        print(f"\nDCP: {dcp_note}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    print("\n" + format_targets(targets))
    write_json(args.json, dict(benchmark="checkpoint", environment=env, state_bytes=nbytes, quick=args.quick,
                               save=[r.to_dict() for r in results], restore=[r.to_dict() for r in restore_results],
                               page_faults_per_call=faults, targets=[t.to_dict() for t in targets], dcp_note=dcp_note))


def run(root, state, model, opt, nbytes, repeats):
    import torch.distributed.checkpoint as dcp

    tensors = state_tensors(model, opt)
    views = [memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()) for t in tensors]
    copies = [torch.empty_like(t) for t in tensors]

    floor_paths = Paths(root, "floor")

    def floor():
        fd = os.open(floor_paths.next(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for v in views:
                while len(v):
                    v = v[os.write(fd, v[: 64 << 20]):]
            os.fsync(fd)
        finally:
            os.close(fd)

    torch_paths = Paths(root, "torch")

    def torch_save():
        with open(torch_paths.next(), "wb") as f:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())

    def plain_copy():
        for c, t in zip(copies, tensors):
            c.copy_(t)

    block_dir = os.path.join(root, "ours-blocking")
    blocking = CheckpointManager(block_dir, keep_last=None, async_save=False)
    async_dir = os.path.join(root, "ours-async")
    managers = {STEADY: CheckpointManager(async_dir, keep_last=None, async_save=True), FIRST: None}
    first_dir = os.path.join(root, "ours-first")
    steps = {"b": 0, STEADY: 0, FIRST: 0}
    faults: dict = {STEADY: [], FIRST: []}

    def clear_dir(d):
        for n in os.listdir(d):
            shutil.rmtree(os.path.join(d, n))

    pending = {"f": None}  # DCP's last future

    def settle():
        """Every setup first lets the background writers (ours, DCP's) finish, so no timed call
        shares the disk with an earlier variant's write."""
        for m in managers.values():
            if m is not None:
                m.wait()
        if pending["f"] is not None:
            pending["f"].result()
            pending["f"] = None

    def after_settle(fn):
        return lambda: (settle(), fn())

    def ours_blocking():
        steps["b"] += 1
        blocking.save(state, steps["b"])

    def steady_setup():
        settle()
        clear_dir(async_dir)

    def first_setup():
        settle()
        managers[FIRST] = None  # its host buffers go with it
        shutil.rmtree(first_dir, ignore_errors=True)
        gc.collect()
        release_free_memory()
        managers[FIRST] = CheckpointManager(first_dir, keep_last=None, async_save=True)

    def ours_async(which):
        def save():
            steps[which] += 1
            f0 = minor_faults()
            managers[which].save(state, steps[which])
            faults[which].append(minor_faults() - f0)
        return save

    variants = [
        Variant("disk floor", floor, setup=after_settle(floor_paths.clear), bytes_per_call=nbytes, role="probe"),
        Variant("torch.save+fsync", torch_save, setup=after_settle(torch_paths.clear), bytes_per_call=nbytes,
                role="torch"),
        Variant("ours blocking", ours_blocking, setup=after_settle(lambda: clear_dir(block_dir)), bytes_per_call=nbytes,
                role="ours"),
        Variant(STEADY, ours_async(STEADY), setup=steady_setup, role="ours"),
        Variant("plain copy", plain_copy, setup=settle, bytes_per_call=nbytes, role="probe"),
        Variant(FIRST, ours_async(FIRST), setup=first_setup, role="ours"),
    ]
    dcp_note = None
    try:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        dcp_paths = Paths(root, "dcp")

        def dcp_setup():
            settle()
            dcp_paths.clear()

        def dcp_async():
            msd, osd = get_state_dict(model, opt)
            pending["f"] = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=dcp_paths.next())

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp_async()
            dcp_setup()
        variants.append(Variant("dcp async stall", dcp_async, setup=dcp_setup, role="torch"))
    except Exception as e:  # reported, not fatal: the other rows still mean something
        dcp_note = f"async_save unavailable here: {type(e).__name__}: {e}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no process group is initialised
        results = measure(variants, repeats=repeats, warmup=1, min_sample_s=0.0, max_calls=1)
        settle()
    if dcp_note is None:
        dcp_note = "async_save works on CPU without a process group (it warns); stall = its staging copy"
    # the timed calls are the last `repeats` of each (warm-up and calibration calls come first)
    faults = {k: statistics.median(v[-repeats:]) for k, v in faults.items()}

    # restore: one checkpoint of each kind, warm in the page cache
    clear_dir(block_dir)
    blocking.save(state, 10**6)
    torch_file = torch_paths.next()
    with open(torch_file, "wb") as f:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
    target_model = type(model)(*[torch.nn.Linear(2048, 2048) for _ in range(len(model))])
    target_opt = torch.optim.AdamW(target_model.parameters(), lr=1e-3)
    target = {"model": target_model, "optim": target_opt}
    restore_mgr = CheckpointManager(block_dir, keep_last=None)

    def ours_restore():
        restore_mgr.restore(target)

    def torch_load_apply():
        sd = torch.load(torch_file, weights_only=True)
        target_model.load_state_dict(sd["model"])
        target_opt.load_state_dict(sd["optim"])

    def torch_load():
        torch.load(torch_file, weights_only=True)

    restore_results = measure([
        Variant("torch.load", torch_load, bytes_per_call=nbytes, role="info"),
        Variant("torch.load+apply", torch_load_apply, bytes_per_call=nbytes, role="torch"),
        Variant("ours restore", ours_restore, bytes_per_call=nbytes, role="ours"),
    ], repeats=2 * repeats + 1, warmup=1, min_sample_s=0.0, max_calls=1)
    restore_mgr.restore(target)
    for a, b in zip(tensors, state_tensors(target_model, target_opt)):
        assert torch.equal(a, b), "restore produced different weights or optimizer state"
    return results, restore_results, dcp_note, faults


if __name__ == "__main__":
    main()
