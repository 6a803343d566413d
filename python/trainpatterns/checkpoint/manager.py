"""CheckpointManager: save and restore the full training state, atomically, checksummed, in the background.

The manager checks what it is given, coordinates the ranks of a distributed job, and decides which
checkpoints to keep. The ``writer`` snapshots the state and writes, seals and commits a checkpoint in
the background; the ``reader`` verifies and loads one; the on-disk format is in ``_format``, the
directory's record (metric, mode, weights entry) in ``_record``. Leftover ``.tmp-*`` files and
directories (from a killed process) are removed when a manager is created; ``step_*.corrupt-*``
directories (damaged checkpoints moved aside when their step is saved again) are kept for
inspection and never listed, restored or removed.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import shutil
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import torch

from .._world import rank_and_world
from ._collective import all_ok, broadcast_steps
from ._fit import CheckpointMismatchError
from ._format import CORRUPT_SUFFIX, STEP_DIR, TMP_PREFIX, CheckpointError, TensorSink, encode_tree, step_dir
from ._record import RECORD, Record, read_record, settle, write_record
from .reader import Loaded, apply_loaded, check_files, load_weights, read_manifest, try_load
from .writer import CheckpointWriter, HostPool, Job

__all__ = ["CheckpointManager", "CheckpointInfo", "CheckpointError", "CheckpointMismatchError", "load_weights"]

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


def _remove_checkpoint(path: str) -> None:
    """Rename out of sight first, so no reader ever sees a half-deleted checkpoint."""
    gone = os.path.join(os.path.dirname(path), TMP_PREFIX + "del-" + os.path.basename(path))
    try:
        os.rename(path, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


_managers: "weakref.WeakSet[CheckpointManager]" = weakref.WeakSet()


@atexit.register
def _wait_at_exit() -> None:
    """Interpreter exit waits for every pending background write (errors are logged)."""
    for m in list(_managers):
        try:
            m.wait()
        except BaseException as e:  # noqa: BLE001 - nothing can be raised to the user at exit
            logging.getLogger("trainpatterns.checkpoint").error("the last checkpoint in %s was not saved: %s",
                                                                m.directory, e)


class CheckpointManager:
    """Saves and restores the full training state in ``directory``.

    Args:
        directory: where checkpoints live (created if missing).
        keep_last: how many of the newest checkpoints to keep (``None``: keep all).
        keep_best: how many of the best checkpoints by ``metrics[metric]`` to keep in addition.
        metric: the metric name ``keep_best`` and ``restore("best")`` rank by.
        mode: ``"min"`` or ``"max"``: whether a smaller or larger metric is better (default "min").
        weights_key: the state entry that holds the model, which :meth:`load_weights` loads when
            not told ``key=``.
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
    filesystem path. The directory records ``metric``, ``mode`` and ``weights_key`` (``manager.json``, written by
    rank 0 at the first save): a manager not given them takes the recorded ones, so
    ``CheckpointManager(directory).load_weights(model, "best")`` needs no more. Given ones win.
    """

    def __init__(self, directory: PathLike, keep_last: Optional[int] = 3, keep_best: int = 0,
                 metric: Optional[str] = None, mode: Optional[str] = None, async_save: bool = True, *,
                 weights_key: Optional[str] = None, rng: bool = True, per_rank: Optional[Iterable[str]] = None,
                 timeout: float = 600.0) -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0):
            raise ValueError(f"keep_last must be an int >= 0 or None (keep all), got {keep_last!r}")
        if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
            raise ValueError(f"keep_best must be an int >= 0, got {keep_best!r}")
        if keep_last == 0 and keep_best == 0:
            raise ValueError("keep_last=0 with keep_best=0 would keep no checkpoint; use keep_last=None to keep all")
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        for name, value in (("metric", metric), ("weights_key", weights_key)):
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep_last = keep_last
        self.keep_best = keep_best
        self._given = Record(metric, mode, weights_key)
        self._on_disk: Optional[Record] = None  # the record as last read or written, None when unknown
        self._settle()
        if keep_best and not self.metric:
            raise ValueError(f"keep_best > 0 needs metric= (the metrics key to rank checkpoints by); the "
                             f"directory {self.directory} records none")
        self.async_save = bool(async_save)
        self.rng = bool(rng)
        self.per_rank = None if per_rank is None else frozenset(per_rank)
        self.timeout = float(timeout)
        self._pool = HostPool()
        self._writer = CheckpointWriter(self._pool)
        self._restored_from: Optional[str] = None
        rank, world = rank_and_world()
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
        ``metrics``: numbers (Python, numpy or one-element tensors) kept in the manifest. Rank 0
        records the manager's metric, mode and weights entry in the directory when its record
        differs (the first save, usually).
        """
        self._join()
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        step = int(step)
        metrics = _metrics_json(metrics)
        self._check_state(state)
        rank, world = rank_and_world()
        if rank == 0:
            self._write_record()
        job = Job(step=step, metrics=metrics, directory=self.directory, rank=rank, world=world, timeout=self.timeout)
        if os.path.exists(job.final):
            self._move_aside_if_bad(job.final, rank)
        self._writer.snapshot(job, state, rng=self.rng, per_rank=self.per_rank, async_save=self.async_save)
        self._writer.submit(job, self._apply_retention, background=self.async_save)

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

    @property
    def restored_from(self) -> Optional[str]:
        """The checkpoint directory the last restore loaded (kept by retention), or None."""
        return self._restored_from

    def list(self, verify: bool = False) -> list[CheckpointInfo]:
        """Every checkpoint in the directory, oldest step first. ``valid`` checks that the manifest
        parses and every file it lists exists with its recorded size; ``verify=True`` also checks
        every checksum (reads everything)."""
        out = []
        for step, path in self._step_dirs():
            try:
                manifest = read_manifest(path)
            except CheckpointError as e:
                out.append(CheckpointInfo(step, {}, path, False, str(e)))
                continue
            problem = check_files(path, manifest, verify)
            out.append(CheckpointInfo(step, manifest["metrics"], path, problem is None, problem))
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
        a shape mismatch), the entries before it have been loaded. A module the checkpoint does not
        fit is a CheckpointMismatchError naming the missing and unexpected keys and the mismatched
        shapes in its first line.
        """
        self._join()
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of name -> object, got {type(state).__qualname__}")
        self._check_state(state)
        if which == "best":  # checked on every rank, before any collective
            self._need_metric()
        rank, world = rank_and_world()
        if which in ("latest", "best"):
            steps = self._ranked_steps(which) if rank == 0 else []
            if world > 1:
                steps = broadcast_steps(steps)
            if not steps:
                return None
            loaded, path = self._load_first_usable(steps, rank, world)
        else:
            path = self._resolve(which)
            loaded = self._load_on_every_rank(path, rank, world)
        return self._apply(state, loaded, path)

    def load_weights(self, module: torch.nn.Module, which: Union[str, int, PathLike] = "latest", *,
                     key: Optional[str] = None, strict: bool = True):
        """Warm start: load only a module's weights from a checkpoint of this manager (``which`` as in
        :meth:`restore`; "latest"/"best" fall back past bad checkpoints with a warning). ``key``
        defaults to the manager's ``weights_key`` (given or recorded). See :func:`load_weights`."""
        self._join()
        if key is None:
            if self._given.weights_key is None:
                self._settle()  # the directory may have been recorded since this manager was created
            key = self.weights_key
        if which in ("latest", "best"):
            if which == "best":
                self._need_metric()
            return self._load_weights_first_usable(module, self._ranked_steps(which), key, strict)
        return load_weights(module, self._resolve(which), key=key, strict=strict)

    # ----- guards and hooks of save() --------------------------------------------------------
    # Warnings raised here and in the restore hooks name the line that called the public method:
    # their stacklevel counts the frames in between.

    def _join(self) -> None:
        self._writer.join()

    def _check_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict of name -> object, got {type(state).__qualname__}")
        for name in state:
            if not isinstance(name, str) or not name:
                raise TypeError(f"state keys must be non-empty strings, got {name!r}")

    def _settle(self) -> None:
        """Metric, mode and weights entry: those given, the rest from the directory's record (a
        malformed record is a CheckpointError, raised only when something is taken from it)."""
        given = self._given
        if None in (given.metric, given.mode, given.weights_key):
            self._on_disk = read_record(self.directory)
        used = settle(given, self._on_disk)
        self.metric, self.mode, self.weights_key = used.metric, used.mode, used.weights_key

    def _need_metric(self) -> None:
        if not self.metric and self._given.metric is None:
            self._settle()  # the directory may have been recorded since this manager was created
        if not self.metric:
            raise ValueError(f"'best' needs a metric to rank checkpoints by: pass metric= (the directory "
                             f"{self.directory} records none in {RECORD})")

    def _write_record(self) -> None:
        """Rank 0 records metric, mode and weights entry at the first save where the directory's
        record differs (nothing when there is nothing to record)."""
        want = Record(self.metric, self.mode if self.metric else None, self.weights_key)
        if want != Record() and want != self._on_disk:
            write_record(self.directory, want)
            self._on_disk = want

    def _move_aside_if_bad(self, final: str, rank: int) -> None:
        """A good checkpoint for this step is never overwritten (CheckpointError). A bad one (a run
        that fell back past it reaches its step again) is renamed to ``<name>.corrupt-<ns>``,
        kept for inspection, so the new one can take its place. "Bad" is what a restore skips:
        every checksum is verified and this rank's share is read as a restore reads it, since a
        restore also falls back past damaged bytes with every size right, or a malformed file with
        its checksum right, and their step must not stay blocked for good."""
        try:
            problem = check_files(final, read_manifest(final), verify=True) or try_load(final, rank)[1]
        except CheckpointError as e:
            problem = str(e)
        if problem is None:
            raise CheckpointError(f"a checkpoint for this step already exists: {final}")
        if rank == 0:
            aside = f"{final}{CORRUPT_SUFFIX}{time.time_ns()}"
            warnings.warn(f"replacing the unusable checkpoint {final} ({problem}); the old one is now {aside}",
                          RuntimeWarning, stacklevel=3)
            try:
                os.rename(final, aside)
            except OSError as e:
                raise CheckpointError(f"cannot move the unusable checkpoint {final} aside: {e.strerror or e}") from e

    # ----- retention -------------------------------------------------------------------------

    def _apply_retention(self, just_written: str) -> None:
        """Run by the writer after each commit: keep the newest ``keep_last`` good checkpoints, the
        best ``keep_best``, the one just written and the one restored from; remove the rest. The
        last two are compared by real path: a restore through a symlinked path still pins its
        checkpoint."""
        if self.keep_last is None:
            return
        infos = [i for i in self.list() if i.valid]
        keep = {i.path for i in infos[max(0, len(infos) - self.keep_last):]}
        if self.keep_best:
            keep |= {i.path for i in self._best_first(infos)[: self.keep_best]}
        pinned = {os.path.realpath(p) for p in (just_written, self._restored_from) if p}
        for info in infos:
            if info.path not in keep and os.path.realpath(info.path) not in pinned:
                _remove_checkpoint(info.path)

    def _best_first(self, infos: list) -> list:
        scored = [(v, i) for i in infos if (v := _metric_value(i, self.metric)) is not None]
        scored.sort(key=lambda vi: (vi[0] if self.mode == "min" else -vi[0], -vi[1].step))
        return [i for _, i in scored]

    def _remove_leftovers(self) -> None:
        for path in (os.path.join(self.directory, n) for n in os.listdir(self.directory) if n.startswith(TMP_PREFIX)):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:  # a record being replaced
                with contextlib.suppress(OSError):
                    os.remove(path)

    # ----- hooks of restore() and load_weights() ---------------------------------------------

    def _step_dirs(self) -> list[tuple[int, str]]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        out = [(int(m.group(1)), os.path.join(self.directory, n)) for n in names if (m := STEP_DIR.match(n))]
        return sorted(out)

    def _ranked_steps(self, which: str) -> list[int]:
        """Steps to try for "latest" / "best", in order (checkpoints that are not even well-formed
        are warned about here and skipped). Called by the public methods themselves."""
        infos = self.list()
        for i in infos:
            if not i.valid:
                warnings.warn(f"checkpoint {i.path} is unusable and skipped: {i.problem}", RuntimeWarning, stacklevel=3)
        good = [i for i in infos if i.valid]
        if which == "latest":
            return [i.step for i in reversed(good)]
        return [i.step for i in self._best_first(good)]

    def _resolve(self, which: Union[int, PathLike]) -> str:
        if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
            path = step_dir(self.directory, int(which))
        elif isinstance(which, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(which))
        else:
            raise TypeError(f"which must be 'latest', 'best', a step number or a path, got {which!r}")
        if not os.path.isdir(path):
            raise CheckpointError(f"no checkpoint at {path}")
        return path

    def _load_first_usable(self, steps: list[int], rank: int, world: int) -> tuple[Loaded, str]:
        """The first of ``steps`` every rank can read, loaded, and its path; unusable ones are warned
        about and skipped."""
        for step in steps:
            path = step_dir(self.directory, step)
            loaded, err = try_load(path, rank)
            ok = loaded is not None if world == 1 else all_ok(loaded is not None)
            if ok:
                return loaded, path
            warnings.warn(f"checkpoint {path} is unusable, trying an older one: "
                          f"{err or 'another rank could not read it'}", RuntimeWarning, stacklevel=3)
        raise CheckpointError(f"no usable checkpoint in {self.directory}: all {len(steps)} failed their checks")

    def _load_on_every_rank(self, path: str, rank: int, world: int) -> Loaded:
        """Checkpoint ``path`` loaded, or CheckpointError if any rank cannot read it."""
        loaded, err = try_load(path, rank)
        if world > 1 and not all_ok(loaded is not None):
            raise CheckpointError(f"checkpoint {path} cannot be restored: {err or 'another rank could not read it'}")
        if loaded is None:
            raise CheckpointError(f"checkpoint {path} cannot be restored: {err}")
        return loaded

    def _apply(self, state: dict, loaded: Loaded, path: str) -> int:
        step = apply_loaded(state, loaded, path, self.rng)
        self._restored_from = path
        return step

    def _load_weights_first_usable(self, module: torch.nn.Module, steps: list[int], key: Optional[str],
                                   strict: bool):
        for step in steps:
            path = step_dir(self.directory, step)
            try:
                return load_weights(module, path, key=key, strict=strict)
            except CheckpointError as e:
                warnings.warn(f"checkpoint {path} is unusable, trying an older one: {e}", RuntimeWarning,
                              stacklevel=3)
        raise CheckpointError(f"no usable checkpoint in {self.directory}")
