"""Checkpoint save stall, save throughput and restore time: ours vs torch.save, DCP and the disk floor.

State: a stack of Linear(2048, 2048) layers plus torch AdamW's two moment buffers, about 1 GB
(--quick: about 200 MB). Every variant writes the same state to a fresh path on the disk that holds
this repository (never tmpfs; the path is printed), with fsync, and old files are deleted outside
the timed region. Variants, timed in turns:

  disk floor         os.write of the same bytes into one file + fsync: what the disk allows
  torch.save+fsync   torch.save of {"model", "optim"} state dicts into a file, then fsync
  ours blocking      CheckpointManager(async_save=False).save(): write, CRC-32, fsync, commit
  ours async stall   CheckpointManager().save() until it returns (host snapshot only); the
                     background write is awaited outside the timed region
  dcp async stall    torch.distributed.checkpoint.async_save() until it returns (its staging);
                     its future is awaited outside the timed region

Restore (page cache warm for both, as right after a save): ours restore() (read, verify every
checksum, load_state_dict) vs torch.load(weights_only=True) followed by the same load_state_dict
calls; torch.load alone for context.

Targets: async stall <= 0.25x torch.save+fsync; blocking save >= 0.7x the disk floor's throughput;
restore no slower than torch.load (+ load_state_dict).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (Target, Variant, apply_threads, common_parser, environment, format_table,  # noqa: E402
                     format_targets, measure, write_json)

from trainpatterns.checkpoint import CheckpointManager  # noqa: E402


def make_state(layers: int, width: int = 2048):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # creates exp_avg / exp_avg_sq
    return model, opt


def state_bytes(model, opt) -> int:
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for s in opt.state.values():
        n += sum(t.numel() * t.element_size() for t in s.values() if isinstance(t, torch.Tensor))
    return n


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
    repeats = 3 if args.quick else 5
    root_parent = args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    root = tempfile.mkdtemp(prefix=".bench-checkpoint-", dir=root_parent)
    fs = os.statvfs(root)
    model, opt = make_state(layers)
    nbytes = state_bytes(model, opt)
    if fs.f_bavail * fs.f_frsize < 4 * nbytes:
        raise SystemExit(f"{root}: not enough free space for a {nbytes / 1e9:.2f} GB benchmark")
    state = {"model": model, "optim": opt}
    env = environment()
    print(f"state: {nbytes / 1e9:.3f} GB in {len(model.state_dict()) * 3} tensors; writing to {root}")
    print(f"threads {env['threads']}, cpu {env['cpu']}")
    try:
        results, restore_results, dcp_note = run(root, state, model, opt, nbytes, repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    by = {r.name: r for r in results}
    print(format_table("save (stall of the training thread)", results, baseline="torch.save+fsync", probe="disk floor"))
    print()
    rby = {r.name: r for r in restore_results}
    print(format_table("restore", restore_results, baseline="torch.load+apply"))
    targets = [
        Target("torch.save+fsync time / ours async stall", by["torch.save+fsync"].median / by["ours async stall"].median,
               4.0, "stall <= 0.25x"),
        Target("ours blocking throughput / disk floor throughput", by["disk floor"].median / by["ours blocking"].median,
               0.7),
        Target("torch.load+apply time / ours restore time", rby["torch.load+apply"].median / rby["ours restore"].median,
               1.0, "restore no slower; ours also verifies every checksum"),
        Target("torch.load alone / ours restore (incl. apply)", rby["torch.load"].median / rby["ours restore"].median,
               None),
    ]
    if "dcp async stall" in by:
        targets.append(Target("dcp async stall / ours async stall",
                              by["dcp async stall"].median / by["ours async stall"].median, None))
    if dcp_note:
        print(f"\nDCP: {dcp_note}")
    print("\n" + format_targets(targets))
    write_json(args.json, dict(benchmark="checkpoint", environment=env, state_bytes=nbytes, quick=args.quick,
                               save=[r.to_dict() for r in results], restore=[r.to_dict() for r in restore_results],
                               targets=[t.to_dict() for t in targets], dcp_note=dcp_note))


def run(root, state, model, opt, nbytes, repeats):
    import torch.distributed.checkpoint as dcp

    tensors = list(model.state_dict().values())
    for s in opt.state.values():
        tensors += [t for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    views = [memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()) for t in tensors]

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

    block_dir = os.path.join(root, "ours-blocking")
    blocking = CheckpointManager(block_dir, keep_last=None, async_save=False)
    async_dir = os.path.join(root, "ours-async")
    asynchronous = CheckpointManager(async_dir, keep_last=None, async_save=True)
    steps = {"b": 0, "a": 0}

    def clear_dir(d):
        for n in os.listdir(d):
            shutil.rmtree(os.path.join(d, n))

    pending = {"f": None}  # DCP's last future

    def settle():
        """Every setup first lets both background writers (ours, DCP's) finish, so no timed call
        shares the disk with an earlier variant's write."""
        asynchronous.wait()
        if pending["f"] is not None:
            pending["f"].result()
            pending["f"] = None

    def after_settle(fn):
        return lambda: (settle(), fn())

    def ours_blocking():
        steps["b"] += 1
        blocking.save(state, steps["b"])

    def ours_async_setup():
        settle()
        clear_dir(async_dir)

    def ours_async():
        steps["a"] += 1
        asynchronous.save(state, steps["a"])

    variants = [
        Variant("disk floor", floor, setup=after_settle(floor_paths.clear), bytes_per_call=nbytes, role="probe"),
        Variant("torch.save+fsync", torch_save, setup=after_settle(torch_paths.clear), bytes_per_call=nbytes,
                role="torch"),
        Variant("ours blocking", ours_blocking, setup=after_settle(lambda: clear_dir(block_dir)), bytes_per_call=nbytes,
                role="ours"),
        Variant("ours async stall", ours_async, setup=ours_async_setup, role="ours"),
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
    for a, b in zip(model.parameters(), target_model.parameters()):
        assert torch.equal(a, b), "restore produced different weights"
    return results, restore_results, dcp_note


if __name__ == "__main__":
    main()
