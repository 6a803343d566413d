"""Loggers as Trainer callbacks: the records of the virtual epochs as a CSV file or TensorBoard scalars.

Each record (the dict ``metrics.jsonl`` holds per virtual epoch: ``epoch``, ``step``, the losses,
the metrics, ``lr``...) becomes one CSV row (:class:`CSVLogger`) or one scalar per key at global
step ``record["step"]`` (:class:`TensorBoardLogger`, through ``torch.utils.tensorboard``). Only rank 0
writes (under torchrun every rank holds the same record).

A resumed run continues the logs without duplicates, as it does ``metrics.jsonl``: a killed run
may have logged virtual epochs whose checkpoint never committed, and the resumed run repeats them.
At the first virtual epoch after the restore, the CSV file is rewritten (atomically) to hold the
restored records, and the TensorBoard writer starts with ``purge_step`` just past the restored step,
which makes TensorBoard discard what earlier writers logged at that step and after.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Optional, Sequence, Union

from .callbacks import Callback

__all__ = ["CSVLogger", "TensorBoardLogger"]

PathLike = Union[str, "os.PathLike[str]"]


def _directory(given: Optional[PathLike], trainer: Any, who: str) -> str:
    """``given``, else the trainer's checkpoint directory."""
    if given is not None:
        return os.fspath(given)
    found = getattr(trainer, "checkpoint_dir", None)
    if found is None:
        raise ValueError(f"{who}() without a path needs a Trainer with checkpoint_dir")
    return os.fspath(found)


class _RecordLogger(Callback):
    """The shared part: rank 0 only; ``_start(records)`` once per ``fit()`` after the restore (with
    the records restored), ``_write(record)`` per virtual epoch, ``_close()`` at the end."""

    def __init__(self) -> None:
        self._started = False

    def on_fit_start(self, trainer: Any) -> None:
        self._started = False

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if getattr(trainer, "rank", 0) == 0 and not self._started:
            self._start(trainer, list(getattr(trainer, "history", ())))
            self._started = True

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict) -> None:
        if getattr(trainer, "rank", 0) == 0:
            if not self._started:  # driven by a loop that skips on_epoch_start
                self.on_epoch_start(trainer, epoch)
            self._write(metrics)

    def on_fit_end(self, trainer: Any) -> None:
        if self._started:
            self._close()
            self._started = False

    def _start(self, trainer: Any, records: list) -> None:
        raise NotImplementedError

    def _write(self, record: dict) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        pass


class CSVLogger(_RecordLogger):
    """One CSV row per virtual epoch, the record's keys as columns (in the order they first appear;
    a key that appears later widens the file, whose earlier rows leave it empty).

    Args:
        path_or_dir: a ``.csv`` file, or a directory that gets ``metrics.csv``; None: the Trainer's
            ``checkpoint_dir``.
    """

    def __init__(self, path_or_dir: Optional[PathLike] = None) -> None:
        super().__init__()
        self.path_or_dir = path_or_dir
        self.path: Optional[str] = None
        self._columns: list = []
        self._rows: list = []

    def _start(self, trainer: Any, records: list) -> None:
        where = _directory(self.path_or_dir, trainer, "CSVLogger")
        self.path = where if where.lower().endswith(".csv") else os.path.join(where, "metrics.csv")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._rows, self._columns = [], []
        for record in records:
            self._add(record)
        self._rewrite()

    def _add(self, record: dict) -> bool:
        """Keep ``record``; True when it brought new columns."""
        self._rows.append(dict(record))
        new = [k for k in record if k not in self._columns]
        self._columns += new
        return bool(new)

    def _text(self, rows: Sequence[dict], header: bool) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self._columns, restval="", lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    def _rewrite(self) -> None:
        """The whole file from the rows kept, replacing the old one atomically."""
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            f.write(self._text(self._rows, header=bool(self._columns)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _write(self, record: dict) -> None:
        if self._add(record):
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            f.write(self._text([record], header=False))


class TensorBoardLogger(_RecordLogger):
    """The records as TensorBoard scalars: one tag per numeric key (``train_loss``, ``val_loss``,
    the metrics, ``lr``, ``epoch``...) at global step ``record["step"]``, flushed every virtual
    epoch. ``tensorboard --logdir LOG_DIR`` shows them.

    Args:
        log_dir: where the event files go; None: the Trainer's ``checkpoint_dir``.

    Needs the ``tensorboard`` package: ``pip install 'trainpatterns[tensorboard]'``.
    """

    def __init__(self, log_dir: Optional[PathLike] = None) -> None:
        super().__init__()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"TensorBoardLogger needs the tensorboard package: pip install "
                              f"'trainpatterns[tensorboard]' ({e})") from e
        self._writer_class = SummaryWriter
        self.log_dir = log_dir
        self.writer: Any = None

    def _start(self, trainer: Any, records: list) -> None:
        steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
        # step 0 is before any record: a fresh run hides whatever an earlier run logged here
        self.writer = self._writer_class(_directory(self.log_dir, trainer, "TensorBoardLogger"),
                                         purge_step=max(steps) + 1 if steps else 0)

    def _write(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def _close(self) -> None:
        self.writer.close()
        self.writer = None
