"""CheckpointManager: save and restore the full training state, atomically, checksummed, in the background.

One directory per checkpoint, ``<directory>/step_00001234/``::

    manifest.json            written last: step, metrics, world size, size + CRC-32 of every file
    state.json               structure of the replicated entries (JSON, tensors by reference)
    <entry>.safetensors      one per replicated entry with tensors; a module's tensors are named by
                             its state_dict keys, so ``model.safetensors`` is a plain weights file
    rank_00000.json          per-rank structure: RNG states and per-rank entries (loaders, ...)
    rank_00000.safetensors   their tensors

A checkpoint is written under ``.tmp-step_...``; every file and the directory are fsynced, then it is
renamed into place and the parent directory is fsynced, so it appears whole or not at all. Leftover
``.tmp-*`` directories (from a killed process) are removed when a manager is created.

Save path: the caller's thread calls ``state_dict()`` on every entry, encodes the structure to JSON
and copies the tensors into reused host buffers (pinned, with non-blocking copies, for CUDA tensors);
one background thread writes, hashes, fsyncs and commits. Nothing in the checkpoint is unpickled at
load (see ``_format``).
"""
from __future__ import annotations

import atexit
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import warnings
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import torch

from ._format import (CheckpointError, DeferredSync, TensorSink, crc32, decode_tree, encode_tree, fsync_dir, read_json_file,
                      read_safetensors, write_json_file, write_safetensors)
from ._rng import capture_rng, restore_rng

__all__ = ["CheckpointManager", "CheckpointInfo", "CheckpointError", "load_weights"]

FORMAT = "trainpatterns.checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}$")
_RESERVED = re.compile(r"^(manifest|state|rank_\d+|entry_\d+)$")  # names of our own files
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint on disk. ``valid`` is the result of the check :meth:`CheckpointManager.list`
    ran (sizes only, or every checksum with ``verify=True``); ``problem`` says what failed."""

    step: int
    metrics: dict
    path: str
    valid: bool
    problem: Optional[str] = None


# --------------------------------------------------------------------------------------------------
# what kind of thing an entry is

def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _kind(obj: Any) -> str:
    if not _is_stateful(obj):
        return "value"
    if isinstance(obj, torch.nn.Module):
        return "module"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return "lr_scheduler"
    if isinstance(obj, torch.amp.GradScaler):
        return "grad_scaler"
    return "stateful"


def _dist() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank."""
    t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _broadcast_steps(steps: list) -> list:
    """Rank 0's list of ints, on every rank (tensors, not pickles)."""
    dev = _collective_device()
    n = torch.tensor([len(steps)], dtype=torch.int64, device=dev)
    torch.distributed.broadcast(n, 0)
    buf = torch.tensor(steps if steps else [0], dtype=torch.int64, device=dev)
    if buf.numel() != max(int(n.item()), 1):
        buf = torch.zeros(max(int(n.item()), 1), dtype=torch.int64, device=dev)
    torch.distributed.broadcast(buf, 0)
    return buf[: int(n.item())].tolist()


def _metrics_json(metrics: Optional[Mapping[str, Any]]) -> dict:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of name -> number, got {type(metrics).__qualname__}")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"metric names must be strings, got {k!r}")
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        elif isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"metric {k!r} must be a number, got {type(v).__qualname__}")
        out[k] = encode_tree(v, TensorSink(), "metrics")  # strict JSON: a NaN loss becomes {"$float": "nan"}
    return out


def _metric_value(info: CheckpointInfo, metric: str) -> Optional[float]:
    v = info.metrics.get(metric)
    if not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


# --------------------------------------------------------------------------------------------------
# the snapshot handed to the writer thread

@dataclass
class _Job:
    step: int
    metrics: dict
    tmp: str
    final: str
    files: list  # (file name, "json" | "safetensors", payload, metadata)
    events: list = field(default_factory=list)  # CUDA events that mark the host copies complete
    rank: int = 0
    world: int = 1


class _HostPool:
    """Host buffers reused across saves, keyed by (file, tensor name): repeated saves of the same
    state allocate nothing. Buffers for CUDA tensors are pinned so the copy can be asynchronous.
    Only one write is in flight at a time, so one buffer per key is enough."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._pinned: dict[tuple, bool] = {}  # tracked here: Tensor.is_pinned() can start CUDA
        self._used: set = set()

    def get(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        self._used.add(key)
        buf = self._bufs.get(key)
        pin = like.is_cuda
        if buf is None or buf.dtype != like.dtype or buf.shape != like.shape or self._pinned[key] != pin:
            buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=pin)
            self._bufs[key] = buf
            self._pinned[key] = pin
        return buf

    def trim(self) -> None:
        """Drop buffers the last save did not use (the state's structure changed)."""
        for key in list(self._bufs):
            if key not in self._used:
                del self._bufs[key], self._pinned[key]
        self._used = set()


_managers: "weakref.WeakSet[CheckpointManager]" = weakref.WeakSet()


@atexit.register
def _wait_at_exit() -> None:
    """Interpreter exit waits for every pending background write (errors go to stderr)."""
    for m in list(_managers):
        try:
            m.wait()
        except BaseException as e:  # noqa: BLE001 - nothing can be raised to the user at exit
            print(f"trainpatterns.checkpoint: the last checkpoint in {m.directory} was not saved: {e}",
                  file=sys.stderr)


class CheckpointManager:
    """Saves and restores the full training state in ``directory``.

    Args:
        directory: where checkpoints live (created if missing).
        keep_last: how many of the newest checkpoints to keep (``None``: keep all).
        keep_best: how many of the best checkpoints by ``metrics[metric]`` to keep in addition.
        metric: the metric name ``keep_best`` and ``restore("best")`` rank by.
        mode: ``"min"`` or ``"max"``: whether a smaller or larger metric is better.
        async_save: write in a background thread (the caller only waits for the host snapshot).
        rng: save the RNG states (Python ``random``, numpy's global generator, torch CPU, every CUDA
            device) with every checkpoint and restore them in :meth:`restore`. ``False`` opts out.
        per_rank: names of state entries that differ between ranks and are saved by every rank.
            Default: every stateful entry that is not a module, optimizer, LR scheduler or
            GradScaler (loaders, samplers, ...). Modules, optimizers, schedulers, scalers and plain
            values are taken as replicated and written by rank 0.
        timeout: seconds rank 0 waits for the other ranks' files before failing a distributed save.

    With torch.distributed initialised, every rank must create the manager and call ``save`` and
    ``restore`` with the same arguments (they coordinate), and ``directory`` must be one shared
    filesystem path.
    """

    def __init__(self, directory: PathLike, keep_last: Optional[int] = 3, keep_best: int = 0,
                 metric: Optional[str] = None, mode: str = "min", async_save: bool = True, *,
                 rng: bool = True, per_rank: Optional[Iterable[str]] = None, timeout: float = 600.0) -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0):
            raise ValueError(f"keep_last must be an int >= 0 or None (keep all), got {keep_last!r}")
        if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
            raise ValueError(f"keep_best must be an int >= 0, got {keep_best!r}")
        if keep_last == 0 and keep_best == 0:
            raise ValueError("keep_last=0 with keep_best=0 would keep no checkpoint; use keep_last=None to keep all")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if keep_best and not metric:
            raise ValueError("keep_best > 0 needs metric= (the metrics key to rank checkpoints by)")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.metric = metric
        self.mode = mode
        self.async_save = bool(async_save)
        self.rng = bool(rng)
        self.per_rank = None if per_rank is None else frozenset(per_rank)
        self.timeout = float(timeout)
        self._pool = _HostPool()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._restored_from: Optional[str] = None
        rank, world = _dist()
        if rank == 0:
            try:
                os.makedirs(self.directory, exist_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot create checkpoint directory {self.directory}: {e.strerror or e}") from e
            self._remove_leftovers()
        if world > 1:
            torch.distributed.barrier()  # no rank writes before rank 0 has cleared leftovers
        _managers.add(self)

    # ----- public API ------------------------------------------------------------------------

    def save(self, state: Mapping[str, Any], step: int, metrics: Optional[Mapping[str, Any]] = None) -> None:
        """Checkpoint ``state`` as ``step``.

        Waits for the previous write first (at most one is in flight) and raises its error if it
        failed, in which case this call saves nothing. With ``async_save`` it returns once the state
        is snapshotted to host memory; the write, fsync and commit run in the background (errors at
        the next ``save``/``wait``). Otherwise it returns once the checkpoint is committed.
        ``metrics``: numbers (Python, numpy or one-element tensors) kept in the manifest.
        """
        self._join()
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        step = int(step)
        metrics = _metrics_json(metrics)
        self._check_state(state)
        rank, world = _dist()
        final = os.path.join(self.directory, f"step_{step:08d}")
        if os.path.exists(final):
            self._move_aside_if_bad(final, rank)
        job = self._snapshot(state, step, metrics, final, rank, world)
        if self.async_save:
            self._thread = threading.Thread(target=self._run, args=(job,), name="trainpatterns-checkpoint",
                                            daemon=True)
            self._thread.start()
        else:
            self._write(job)

    def wait(self) -> None:
        """Block until the pending background write (if any) is committed; raise its error if it failed."""
        self._join()

    def close(self) -> None:
        """Same as :meth:`wait`; the manager stays usable."""
        self._join()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self._join()

    def list(self, verify: bool = False) -> list[CheckpointInfo]:
        """Every checkpoint in the directory, oldest step first. ``valid`` checks that the manifest
        parses and every file it lists exists with its recorded size; ``verify=True`` also checks
        every checksum (reads everything)."""
        out = []
        for step, path in self._step_dirs():
            try:
                manifest = _read_manifest(path)
            except CheckpointError as e:
                out.append(CheckpointInfo(step, {}, path, False, str(e)))
                continue
            problem = _check_files(path, manifest, verify)
            metrics = {k: decode_tree(v, {}) for k, v in manifest.get("metrics", {}).items()}
            out.append(CheckpointInfo(step, metrics, path, problem is None, problem))
        return out

    def restore(self, state: dict, which: Union[str, int, PathLike] = "latest") -> Optional[int]:
        """Load a checkpoint into ``state`` (in place) and return its step, or None if there is none.

        ``which``: ``"latest"``, ``"best"`` (by ``metric``/``mode``), a step number, or a checkpoint
        directory path. For "latest"/"best", a checkpoint that fails its checks is skipped with a
        warning naming it and the next one is tried; if checkpoints exist but none is good,
        CheckpointError. A named checkpoint that fails raises CheckpointError. Nothing is applied
        until every file this rank needs has been read and verified.

        Stateful entries get ``load_state_dict``; plain values are replaced in ``state``. Tensors go
        to the device of the live object's tensor at the same place (else their saved device when
        present, else CPU). Every entry of ``state`` must be in the checkpoint; checkpoint entries
        absent from ``state`` are ignored with a warning. RNG states are restored unless ``rng=False``.
        Entries are loaded in ``state``'s order; if an object's own ``load_state_dict`` raises (say,
        a shape mismatch), the entries before it have been loaded.
        """
        self._join()
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of name -> object, got {type(state).__qualname__}")
        self._check_state(state)
        if which == "best" and not self.metric:  # checked on every rank, before any collective
            raise ValueError("restore('best') needs the manager's metric= to rank checkpoints by")
        rank, world = _dist()
        if which in ("latest", "best"):
            steps = self._ranked_steps(which) if rank == 0 else []
            if world > 1:
                steps = _broadcast_steps(steps)
            if not steps:
                return None
            for step in steps:
                path = os.path.join(self.directory, f"step_{step:08d}")
                loaded, err = _try_load(path, rank)
                ok = loaded is not None if world == 1 else _all_ok(loaded is not None)
                if ok:
                    return self._apply(state, loaded, path)
                warnings.warn(f"checkpoint {path} is unusable, trying an older one: "
                              f"{err or 'another rank could not read it'}", RuntimeWarning, stacklevel=2)
            raise CheckpointError(f"no usable checkpoint in {self.directory}: all {len(steps)} failed their checks")
        path = self._resolve(which)
        loaded, err = _try_load(path, rank)
        if world > 1 and not _all_ok(loaded is not None):
            raise CheckpointError(f"checkpoint {path} cannot be restored: {err or 'another rank could not read it'}")
        if loaded is None:
            raise CheckpointError(f"checkpoint {path} cannot be restored: {err}")
        return self._apply(state, loaded, path)

    def load_weights(self, module: torch.nn.Module, which: Union[str, int, PathLike] = "latest", *,
                     key: Optional[str] = None, strict: bool = True):
        """Warm start: load only a module's weights from a checkpoint of this manager (``which`` as in
        :meth:`restore`; "latest"/"best" fall back past bad checkpoints with a warning). See
        :func:`load_weights`."""
        self._join()
        if which in ("latest", "best"):
            for step in self._ranked_steps(which):
                path = os.path.join(self.directory, f"step_{step:08d}")
                try:
                    return load_weights(module, path, key=key, strict=strict)
                except CheckpointError as e:
                    warnings.warn(f"checkpoint {path} is unusable, trying an older one: {e}", RuntimeWarning,
                                  stacklevel=2)
            raise CheckpointError(f"no usable checkpoint in {self.directory}")
        return load_weights(module, self._resolve(which), key=key, strict=strict)

    # ----- saving ----------------------------------------------------------------------------

    def _check_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict of name -> object, got {type(state).__qualname__}")
        for name in state:
            if not isinstance(name, str) or not name:
                raise TypeError(f"state keys must be non-empty strings, got {name!r}")

    def _move_aside_if_bad(self, final: str, rank: int) -> None:
        """A good checkpoint for this step is never overwritten (CheckpointError). A bad one (a run
        that fell back past it reaches its step again) is renamed to ``<name>.corrupt-<time>``,
        kept for inspection, so the new one can take its place."""
        try:
            problem = _check_files(final, _read_manifest(final), verify=False)
        except CheckpointError as e:
            problem = str(e)
        if problem is None:
            raise CheckpointError(f"a checkpoint for this step already exists: {final}")
        if rank == 0:
            aside = f"{final}.corrupt-{int(time.time())}"
            warnings.warn(f"replacing the unusable checkpoint {final} ({problem}); the old one is now {aside}",
                          RuntimeWarning, stacklevel=3)
            try:
                os.rename(final, aside)
            except OSError as e:
                raise CheckpointError(f"cannot move the unusable checkpoint {final} aside: {e.strerror or e}") from e

    def _is_per_rank(self, name: str, kind: str) -> bool:
        if self.per_rank is not None:
            return name in self.per_rank
        return kind == "stateful"

    def _snapshot(self, state, step, metrics, final, rank, world) -> _Job:
        """Run in the caller's thread: state_dict() everything, encode, copy tensors to host."""
        shared_entries, rank_entries = {}, {}
        shared_files: dict[str, TensorSink] = {}
        rank_sink = TensorSink()
        for i, (name, obj) in enumerate(state.items()):
            kind = _kind(obj)
            per_rank = self._is_per_rank(name, kind)
            if rank != 0 and not per_rank:
                continue  # replicated: rank 0 writes it
            value = obj.state_dict() if kind != "value" else obj
            where = f"state[{name!r}]"
            if per_rank:
                rank_entries[name] = {"kind": kind, "tree": encode_tree(value, rank_sink, where, (name,))}
                continue
            sink = TensorSink()
            tree = encode_tree(value, sink, where)
            fname = None
            if sink.tensors:
                # entry names are unique, and generated names are reserved, so file names are too
                fname = f"{name}.safetensors" if _SAFE_NAME.match(name) and not _RESERVED.match(name) else f"entry_{i}.safetensors"
                shared_files[fname] = sink
            shared_entries[name] = {"kind": kind, "file": fname, "tree": tree}
        rng_tree = encode_tree(capture_rng(), rank_sink, "rng", ("rng",)) if self.rng else None
        rank_base = f"rank_{rank:05d}"
        files = []
        events: list = []
        cuda_devices: set = set()
        if rank == 0:
            files.append(("state.json", "json", {"format": FORMAT, "version": VERSION, "entries": shared_entries}, None))
        for fname, sink in shared_files.items():
            files.append((fname, "safetensors", self._to_host(fname, sink.tensors, cuda_devices),
                          {"format": FORMAT, "step": str(step)}))
        rank_doc = {"format": FORMAT, "version": VERSION, "rank": rank, "rng": rng_tree, "entries": rank_entries,
                    "file": f"{rank_base}.safetensors" if rank_sink.tensors else None}
        files.append((f"{rank_base}.json", "json", rank_doc, None))
        if rank_sink.tensors:
            files.append((f"{rank_base}.safetensors", "safetensors",
                          self._to_host(rank_base, rank_sink.tensors, cuda_devices),
                          {"format": FORMAT, "step": str(step), "rank": str(rank)}))
        for dev in sorted(cuda_devices):
            with torch.cuda.device(dev):
                ev = torch.cuda.Event()
                ev.record()  # on the current stream, after the copies
                events.append(ev)
        self._pool.trim()
        if not self.async_save and events:
            for ev in events:
                ev.synchronize()
            events = []
        tmp = os.path.join(self.directory, ".tmp-" + os.path.basename(final))
        return _Job(step, metrics, tmp, final, files, events, rank, world)

    def _to_host(self, fname: str, tensors: dict, cuda_devices: set) -> dict:
        """Contiguous CPU tensors holding the bytes to write. Async: copies into pooled buffers
        (the training thread may change the originals right after). Blocking: CPU tensors as they
        are (the caller waits for the write), CUDA tensors copied to host."""
        out = {}
        for name, t in tensors.items():
            t = t.detach()
            if t.is_cuda:
                cuda_devices.add(t.device.index)
            if self.async_save or t.device.type != "cpu":
                buf = self._pool.get((fname, name), t)
                buf.copy_(t, non_blocking=t.is_cuda)
                out[name] = buf
            else:
                out[name] = t if t.is_contiguous() else t.contiguous()
        return out

    def _run(self, job: _Job) -> None:
        try:
            self._write(job)
        except BaseException as e:  # noqa: BLE001 - re-raised at the next save()/wait()
            self._error = e

    def _join(self) -> None:
        t = self._thread
        if t is not None:
            t.join()
            self._thread = None
        err, self._error = self._error, None
        if err is not None:
            raise err

    def _write(self, job: _Job) -> None:
        """Write one checkpoint: files into the temporary directory, fsync, then (rank 0) commit."""
        for ev in job.events:
            ev.synchronize()
        try:
            os.makedirs(job.tmp, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create {job.tmp}: {e.strerror or e} (errno {e.errno}); "
                                  "no checkpoint was written, earlier ones are untouched") from e
        pending = DeferredSync()
        try:
            sums = {}
            for fname, fmt, payload, metadata in job.files:
                path = os.path.join(job.tmp, fname)
                if fmt == "json":
                    sums[fname] = write_json_file(path, payload, defer_sync=pending)
                else:
                    sums[fname] = write_safetensors(path, payload, metadata, defer_sync=pending)
            pending.sync_all()  # every data file is durable before its sums or manifest exist
            if job.rank != 0:
                part = os.path.join(job.tmp, f"rank_{job.rank:05d}.sums.part")
                write_json_file(part, {k: list(v) for k, v in sums.items()})
                os.rename(part, os.path.join(job.tmp, f"rank_{job.rank:05d}.sums"))
                return
            if job.world > 1:
                sums.update(self._gather_sums(job))
            body = {"format": FORMAT, "version": VERSION, "step": job.step, "metrics": job.metrics,
                    "world_size": job.world, "time": time.time(),
                    "files": {k: {"size": s, "crc32": c} for k, (s, c) in sorted(sums.items())}}
            write_json_file(os.path.join(job.tmp, "manifest.json"), _seal(body))
            fsync_dir(job.tmp)
            os.rename(job.tmp, job.final)
            fsync_dir(self.directory)
        except BaseException as e:
            pending.close()
            if job.rank == 0:
                shutil.rmtree(job.tmp, ignore_errors=True)  # frees the space; it was never visible
            else:
                _tell_rank0(job, e)
            if isinstance(e, OSError):
                raise CheckpointError(f"saving step {job.step} to {self.directory} failed: {e.strerror or e} "
                                      f"(errno {e.errno}); earlier checkpoints are untouched") from e
            if isinstance(e, CheckpointError):
                raise CheckpointError(f"saving step {job.step} failed: {e}; earlier checkpoints are untouched") from e
            raise
        self._apply_retention(job.final)

    def _gather_sums(self, job: _Job) -> dict:
        """Rank 0: wait for every other rank's file sums (they write ``rank_N.sums`` last)."""
        out = {}
        deadline = time.monotonic() + self.timeout
        pause = 0.005
        for r in range(1, job.world):
            path = os.path.join(job.tmp, f"rank_{r:05d}.sums")
            failed = os.path.join(job.tmp, f"rank_{r:05d}.failed")
            while not os.path.exists(path):
                if os.path.exists(failed):
                    with open(failed, encoding="utf-8", errors="replace") as f:
                        raise CheckpointError(f"rank {r} could not write step {job.step}: {f.read()}")
                if time.monotonic() > deadline:
                    raise CheckpointError(f"rank {r} did not finish writing step {job.step} within "
                                          f"{self.timeout:g} s")
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
            for k, v in read_json_file(path).items():
                out[k] = tuple(v)
            os.remove(path)
        return out

    # ----- retention -------------------------------------------------------------------------

    def _apply_retention(self, just_written: str) -> None:
        if self.keep_last is None:
            return
        infos = [i for i in self.list() if i.valid]
        keep = {i.path for i in infos[max(0, len(infos) - self.keep_last):]}
        if self.keep_best:
            keep |= {i.path for i in self._best_first(infos)[: self.keep_best]}
        keep |= {just_written, self._restored_from}
        for info in infos:
            if info.path not in keep:
                _remove_checkpoint(info.path)

    def _best_first(self, infos: list) -> list:
        scored = [(v, i) for i in infos if (v := _metric_value(i, self.metric)) is not None]
        scored.sort(key=lambda vi: (vi[0] if self.mode == "min" else -vi[0], -vi[1].step))
        return [i for _, i in scored]

    # ----- restoring -------------------------------------------------------------------------

    def _step_dirs(self) -> list[tuple[int, str]]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        out = [(int(m.group(1)), os.path.join(self.directory, n)) for n in names if (m := _STEP_DIR.match(n))]
        return sorted(out)

    def _ranked_steps(self, which: str) -> list[int]:
        """Steps to try for "latest" / "best", in order (checkpoints that are not even well-formed
        are warned about here and skipped)."""
        infos = self.list()
        for i in infos:
            if not i.valid:
                warnings.warn(f"checkpoint {i.path} is unusable and skipped: {i.problem}", RuntimeWarning, stacklevel=3)
        good = [i for i in infos if i.valid]
        if which == "latest":
            return [i.step for i in reversed(good)]
        if not self.metric:
            raise ValueError("restore('best') needs the manager's metric= to rank checkpoints by")
        return [i.step for i in self._best_first(good)]

    def _resolve(self, which: Union[int, PathLike]) -> str:
        if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
            path = os.path.join(self.directory, f"step_{int(which):08d}")
        elif isinstance(which, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(which))
        else:
            raise TypeError(f"which must be 'latest', 'best', a step number or a path, got {which!r}")
        if not os.path.isdir(path):
            raise CheckpointError(f"no checkpoint at {path}")
        return path

    def _apply(self, state: dict, loaded: "_Loaded", path: str) -> int:
        entries = dict(loaded.shared)
        entries.update(loaded.rank_entries)
        missing = [n for n in state if n not in entries]
        if missing:
            raise CheckpointError(f"checkpoint {path} has no entry for {missing} (it holds {sorted(entries)}); "
                                  "nothing was restored")
        for name, obj in state.items():
            saved_kind = entries[name]["kind"]
            if (saved_kind == "value") != (_kind(obj) == "value"):
                raise CheckpointError(f"state[{name!r}] is a {_kind(obj)} here but a {saved_kind} in {path}; "
                                      "nothing was restored")
        extra = sorted(set(entries) - set(state))
        if extra:
            warnings.warn(f"checkpoint {path} also holds {extra}, which state does not name: not restored",
                          RuntimeWarning, stacklevel=3)
        for name, obj in list(state.items()):
            e = entries[name]
            tensors = loaded.tensors_for(name)
            where = f"{path}: state[{name!r}]"
            if _kind(obj) == "value":
                state[name] = decode_tree(e["tree"], tensors, obj, where)
            else:
                obj.load_state_dict(decode_tree(e["tree"], tensors, obj.state_dict(), where))
        if self.rng:
            if loaded.rng_tree is None:
                warnings.warn(f"checkpoint {path} holds no RNG states (saved with rng=False): RNGs not restored",
                              RuntimeWarning, stacklevel=3)
            else:
                restore_rng(decode_tree(loaded.rng_tree, loaded.rank_tensors, None, f"{path}: rng"))
        self._restored_from = path
        return loaded.step

    def _remove_leftovers(self) -> None:
        for n in os.listdir(self.directory):
            if n.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.directory, n), ignore_errors=True)


def _tell_rank0(job: _Job, error: BaseException) -> None:
    """Best effort: leave the reason for rank 0, so it fails now instead of at its timeout."""
    try:
        with open(os.path.join(job.tmp, f"rank_{job.rank:05d}.failed"), "w", encoding="utf-8") as f:
            f.write(str(error) or type(error).__name__)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------
# reading

def _seal(body: dict) -> dict:
    """The manifest with a CRC-32 of its own canonical JSON, so a damaged manifest is detected too."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return dict(body, crc32=zlib.crc32(text.encode("utf-8")))


def _read_manifest(path: str) -> dict:
    mpath = os.path.join(path, "manifest.json")
    if not os.path.exists(mpath):
        raise CheckpointError(f"{path} has no manifest.json (not a checkpoint, or not fully written)")
    manifest = read_json_file(mpath)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not a {FORMAT} manifest")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{mpath} has format version {manifest.get('version')}; this version reads {VERSION}")
    body = {k: v for k, v in manifest.items() if k != "crc32"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    if zlib.crc32(text.encode("utf-8")) != manifest.get("crc32"):
        raise CheckpointError(f"{mpath} fails its checksum: the manifest is corrupt")
    return manifest


def _check_files(path: str, manifest: dict, verify: bool) -> Optional[str]:
    """None if every file of the manifest is present with its size (and checksum, with verify)."""
    for fname, info in manifest["files"].items():
        fpath = os.path.join(path, fname)
        try:
            size = os.path.getsize(fpath)
        except OSError:
            return f"{fpath} is missing"
        if size != info["size"]:
            return f"{fpath} is {size} bytes, the manifest says {info['size']}: truncated or overwritten"
        if verify:
            crc = 0
            with open(fpath, "rb", buffering=0) as f:
                while chunk := f.read(32 << 20):
                    crc = crc32(chunk, crc)
            if crc != info["crc32"]:
                return f"{fpath} fails its checksum (CRC-32 {crc:08x}, manifest {info['crc32']:08x}): the file is corrupt"
    return None


@dataclass
class _Loaded:
    """A checkpoint read and verified for one rank, not yet applied."""

    step: int
    shared: dict  # name -> {"kind", "file", "tree"}
    shared_tensors: dict  # file name -> {tensor name -> tensor}
    rank_entries: dict
    rank_tensors: dict
    rng_tree: Any

    def tensors_for(self, name: str) -> dict:
        if name in self.rank_entries:
            return self.rank_tensors
        f = self.shared[name].get("file")
        return self.shared_tensors.get(f, {}) if f else {}


def _expected(manifest: dict, path: str, fname: str) -> tuple[int, int]:
    info = manifest["files"].get(fname)
    if info is None:
        raise CheckpointError(f"{path}: {fname} is not in the manifest")
    return info["size"], info["crc32"]


def _load(path: str, rank: int) -> _Loaded:
    manifest = _read_manifest(path)
    world = manifest.get("world_size", 1)
    if rank >= world:
        raise CheckpointError(f"{path} was written by {world} rank(s): it holds no state for rank {rank}")
    state_doc = read_json_file(os.path.join(path, "state.json"), _expected(manifest, path, "state.json"))
    shared = state_doc["entries"]
    shared_tensors = {}
    for e in shared.values():
        f = e.get("file")
        if f:  # a module's tensors are copied into its parameters by load_state_dict: no copy here
            shared_tensors[f], _ = read_safetensors(os.path.join(path, f), _expected(manifest, path, f),
                                                    copy=e["kind"] != "module")
    base = f"rank_{rank:05d}"
    rank_doc = read_json_file(os.path.join(path, base + ".json"), _expected(manifest, path, base + ".json"))
    rank_tensors = {}
    if rank_doc.get("file"):
        f = rank_doc["file"]
        rank_tensors, _ = read_safetensors(os.path.join(path, f), _expected(manifest, path, f))
    return _Loaded(int(manifest["step"]), shared, shared_tensors, rank_doc["entries"], rank_tensors, rank_doc.get("rng"))


def _try_load(path: str, rank: int) -> tuple[Optional[_Loaded], Optional[str]]:
    try:
        return _load(path, rank), None
    except CheckpointError as e:
        return None, str(e)
    except (KeyError, TypeError, ValueError) as e:
        return None, f"{path} is malformed ({e!r})"


def _remove_checkpoint(path: str) -> None:
    """Rename out of sight first, so no reader ever sees a half-deleted checkpoint."""
    gone = os.path.join(os.path.dirname(path), ".tmp-del-" + os.path.basename(path))
    try:
        os.rename(path, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def load_weights(module: torch.nn.Module, path: PathLike, *, key: Optional[str] = None, strict: bool = True):
    """Load a module's weights from a checkpoint directory (or a ``.safetensors`` file) for a warm
    start: no optimizer, RNG or loader state is touched. ``key`` names the entry when the checkpoint
    holds several modules (default: the only one). ``strict`` as in ``Module.load_state_dict`` (use
    ``strict=False`` after replacing a head). Checksums are verified. Returns what
    ``load_state_dict`` returns (missing and unexpected keys)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"load_weights needs a torch.nn.Module, got {type(module).__qualname__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        tensors, _ = read_safetensors(path, copy=False)
        live = module.state_dict()
        sd = {k: (t.to(live[k].device) if k in live else t) for k, t in tensors.items()}
        return module.load_state_dict(sd, strict=strict)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}")
    manifest = _read_manifest(path)
    shared = read_json_file(os.path.join(path, "state.json"), _expected(manifest, path, "state.json"))["entries"]
    modules = [n for n, e in shared.items() if e["kind"] == "module"]
    if key is None:
        if len(modules) != 1:
            raise ValueError(f"{path} holds {len(modules)} modules {modules}: pass key= to choose one")
        key = modules[0]
    if key not in shared:
        raise ValueError(f"{path} has no entry {key!r} (modules: {modules})")
    e = shared[key]
    tensors = {}
    if e.get("file"):
        tensors, _ = read_safetensors(os.path.join(path, e["file"]), _expected(manifest, path, e["file"]), copy=False)
    sd = decode_tree(e["tree"], tensors, module.state_dict(), f"{path}: state[{key!r}]")
    return module.load_state_dict(sd, strict=strict)
