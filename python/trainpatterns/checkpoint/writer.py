"""Writing checkpoints: snapshot to reused host buffers, then write, seal and commit in the background.

Save path: the caller's thread calls ``state_dict()`` on every entry, encodes the structure to JSON
and copies the tensors into reused host buffers (pinned, with non-blocking copies, for CUDA tensors;
large CPU tensors in one pass split over a few threads; a tensor tied under several names is copied
once) (:meth:`CheckpointWriter.snapshot`); one background thread then writes, hashes, fsyncs and
commits (:func:`write_checkpoint`). At most one write is in flight, and it writes from its own host
copies, so training may change its tensors while it runs.

Atomicity: a checkpoint is written under ``.tmp-step_...``; every file and the directory are
fsynced, then it is renamed into place and the parent directory is fsynced, so it appears whole or
not at all. Distributed: every rank writes its own files into rank 0's temporary directory and
leaves ``rank_N.sums`` (sizes and CRC-32s) last; rank 0 waits for them, writes the manifest (the
seal over everything) and commits. The file layout is in ``_format.layout``.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from ._format import (FORMAT, TMP_PREFIX, VERSION, CheckpointError, DeferredSync, TensorSink, copy_tensors,
                      encode_tree, entry_file, entry_kind, fsync_dir, plain_bytes, rank_base, read_json_file, seal,
                      step_dir, write_json_file, write_safetensors)
from ._rng import capture_rng

__all__ = ["Job", "HostPool", "CheckpointWriter", "write_checkpoint"]

_SPLIT_COPY = 1 << 16  # bytes from which torch's own copy would split a tensor over its threads


@dataclass
class Job:
    """One checkpoint on its way to disk. The manager fills in what the save is (step, metrics,
    where, which rank of how many, how long rank 0 waits for the others); :meth:`CheckpointWriter.
    snapshot` adds the files and the CUDA events that mark their host copies complete."""

    step: int
    metrics: dict
    directory: str
    rank: int = 0
    world: int = 1
    timeout: float = 600.0  # seconds rank 0 waits for the other ranks' files
    files: list = field(default_factory=list)  # (file name, "json" | "safetensors", payload, metadata)
    events: list = field(default_factory=list)  # CUDA events that mark the host copies complete

    @property
    def final(self) -> str:
        """Where the committed checkpoint lives."""
        return step_dir(self.directory, self.step)

    @property
    def tmp(self) -> str:
        """Where it is written until the commit renames it to :attr:`final`."""
        return os.path.join(self.directory, TMP_PREFIX + os.path.basename(self.final))


class HostPool:
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


def _metadata(sink: TensorSink, **fields: str) -> dict[str, str]:
    """A safetensors file's metadata: ``fields``, then each name stored as another's tensor (tied
    weights) -> that name, as safetensors' ``save_model`` records them (never over a field)."""
    out = dict(fields)
    for alias, stored in sink.aliases.items():
        out.setdefault(alias, stored)
    return out


def _is_per_rank(name: str, kind: str, per_rank: Optional[frozenset]) -> bool:
    if per_rank is not None:
        return name in per_rank
    return kind == "stateful"


class CheckpointWriter:
    """The save path of one manager: :meth:`snapshot` in the caller's thread, then :meth:`submit`
    to write in a background thread (or in the caller's). At most one write is in flight; its error
    is kept and raised by the next :meth:`join`."""

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def snapshot(self, job: Job, state: Mapping[str, Any], *, rng: bool, per_rank: Optional[frozenset],
                 async_save: bool) -> None:
        """Run in the caller's thread: state_dict() everything, encode, copy tensors to host, and
        put the files to write into ``job``. ``per_rank``: names saved by every rank (None: every
        "stateful" entry); ``async_save``: copy every tensor, since training goes on meanwhile."""
        rank, step = job.rank, job.step
        shared_entries, rank_entries = {}, {}
        shared_files: dict[str, TensorSink] = {}
        rank_sink = TensorSink()
        for i, (name, obj) in enumerate(state.items()):
            kind = entry_kind(obj)
            is_per_rank = _is_per_rank(name, kind, per_rank)
            if rank != 0 and not is_per_rank:
                continue  # replicated: rank 0 writes it
            value = obj.state_dict() if kind != "value" else obj
            where = f"state[{name!r}]"
            if is_per_rank:
                rank_entries[name] = {"kind": kind, "tree": encode_tree(value, rank_sink, where, (name,))}
                continue
            sink = TensorSink()
            tree = encode_tree(value, sink, where)
            fname = None
            if sink.tensors:
                fname = entry_file(name, i)
                shared_files[fname] = sink
            shared_entries[name] = {"kind": kind, "file": fname, "tree": tree}
        rng_tree = encode_tree(capture_rng(), rank_sink, "rng", ("rng",)) if rng else None
        base = rank_base(rank)
        files = []
        events: list = []
        cuda_devices: set = set()
        copies: list = []  # (pooled buffer, CPU tensor): copied together at the end
        if rank == 0:
            state_doc = {"format": FORMAT, "version": VERSION, "entries": shared_entries}
            files.append(("state.json", "json", state_doc, None))
        for fname, sink in shared_files.items():
            files.append((fname, "safetensors", self._to_host(fname, sink.tensors, cuda_devices, async_save, copies),
                          _metadata(sink, format=FORMAT, step=str(step))))
        rank_doc = {"format": FORMAT, "version": VERSION, "rank": rank, "rng": rng_tree, "entries": rank_entries,
                    "file": f"{base}.safetensors" if rank_sink.tensors else None}
        files.append((f"{base}.json", "json", rank_doc, None))
        if rank_sink.tensors:
            files.append((f"{base}.safetensors", "safetensors",
                          self._to_host(base, rank_sink.tensors, cuda_devices, async_save, copies),
                          _metadata(rank_sink, format=FORMAT, step=str(step), rank=str(rank))))
        copy_tensors(copies)
        for dev in sorted(cuda_devices):
            with torch.cuda.device(dev):
                ev = torch.cuda.Event()
                ev.record()  # on the current stream, after the copies
                events.append(ev)
        self.pool.trim()
        if not async_save and events:
            for ev in events:
                ev.synchronize()
            events = []
        job.files, job.events = files, events

    def _to_host(self, fname: str, tensors: dict, cuda_devices: set, async_save: bool, copies: list) -> dict:
        """Contiguous CPU tensors holding the bytes to write. Async: copies into pooled buffers
        (the training thread may change the originals right after); a CPU tensor of
        ``_SPLIT_COPY`` bytes or more goes to ``copies``, which the caller copies in one split pass
        (see ``_format.threads``). Blocking: CPU tensors as they are (the caller waits for the
        write), CUDA tensors copied to host."""
        out = {}
        for name, t in tensors.items():
            t = t.detach()
            if t.is_cuda:
                cuda_devices.add(t.device.index)
            if async_save or t.device.type != "cpu":
                buf = self.pool.get((fname, name), t)
                if t.numel() * t.element_size() >= _SPLIT_COPY and plain_bytes(t):
                    copies.append((buf, t))
                else:
                    buf.copy_(t, non_blocking=t.is_cuda)
                out[name] = buf
            else:
                out[name] = t if t.is_contiguous() else t.contiguous()
        return out

    def submit(self, job: Job, after_commit: Callable[[str], None], *, background: bool) -> None:
        """Write ``job`` and then call ``after_commit(job.final)`` (retention): in a background
        thread, errors kept for :meth:`join`; or now, errors raised."""
        if background:
            self._thread = threading.Thread(target=self._run, args=(job, after_commit),
                                            name="trainpatterns-checkpoint", daemon=True)
            self._thread.start()
        else:
            self._write(job, after_commit)

    def join(self) -> None:
        """Block until the write in flight (if any) is done; raise its error if it failed."""
        t = self._thread
        if t is not None:
            t.join()
            self._thread = None
        err, self._error = self._error, None
        if err is not None:
            raise err

    def _write(self, job: Job, after_commit: Callable[[str], None]) -> None:
        write_checkpoint(job)
        after_commit(job.final)

    def _run(self, job: Job, after_commit: Callable[[str], None]) -> None:
        try:
            self._write(job, after_commit)
        except BaseException as e:  # noqa: BLE001 - re-raised at the next save()/wait()
            self._error = e


def write_checkpoint(job: Job) -> None:
    """Write one checkpoint: files into the temporary directory, fsync, then (rank 0) seal and
    commit. On failure rank 0 removes the temporary directory (it was never visible) and another
    rank tells rank 0 why; earlier checkpoints are never touched."""
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
            base = os.path.join(job.tmp, rank_base(job.rank))
            write_json_file(base + ".sums.part", {k: list(v) for k, v in sums.items()})
            os.rename(base + ".sums.part", base + ".sums")
            return
        if job.world > 1:
            sums.update(_gather_sums(job))
        body = {"format": FORMAT, "version": VERSION, "step": job.step, "metrics": job.metrics,
                "world_size": job.world, "time": time.time(),
                "files": {k: {"size": s, "crc32": c} for k, (s, c) in sorted(sums.items())}}
        write_json_file(os.path.join(job.tmp, "manifest.json"), seal(body))
        fsync_dir(job.tmp)
        os.rename(job.tmp, job.final)
        fsync_dir(job.directory)
    except BaseException as e:
        pending.close()
        if job.rank == 0:
            shutil.rmtree(job.tmp, ignore_errors=True)  # frees the space; it was never visible
        else:
            _tell_rank0(job, e)
        if isinstance(e, OSError):
            raise CheckpointError(f"saving step {job.step} to {job.directory} failed: {e.strerror or e} "
                                  f"(errno {e.errno}); earlier checkpoints are untouched") from e
        if isinstance(e, CheckpointError):
            raise CheckpointError(f"saving step {job.step} failed: {e}; earlier checkpoints are untouched") from e
        raise


def _gather_sums(job: Job) -> dict:
    """Rank 0: wait for every other rank's file sums (they write ``rank_N.sums`` last)."""
    out = {}
    deadline = time.monotonic() + job.timeout
    pause = 0.005
    for r in range(1, job.world):
        path = os.path.join(job.tmp, rank_base(r) + ".sums")
        failed = os.path.join(job.tmp, rank_base(r) + ".failed")
        while not os.path.exists(path):
            if os.path.exists(failed):
                with open(failed, encoding="utf-8", errors="replace") as f:
                    raise CheckpointError(f"rank {r} could not write step {job.step}: {f.read()}")
            if time.monotonic() > deadline:
                raise CheckpointError(f"rank {r} did not finish writing step {job.step} within "
                                      f"{job.timeout:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        for k, v in read_json_file(path).items():
            out[k] = tuple(v)
        os.remove(path)
    return out


def _tell_rank0(job: Job, error: BaseException) -> None:
    """Best effort: leave the reason for rank 0, so it fails now instead of at its timeout."""
    try:
        with open(os.path.join(job.tmp, rank_base(job.rank) + ".failed"), "w", encoding="utf-8") as f:
            f.write(str(error) or type(error).__name__)
    except OSError:
        pass
