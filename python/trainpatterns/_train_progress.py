"""What the Trainer shows: its one-line messages, the per-virtual-epoch summary and the tqdm bar.

Everything is said on rank 0 only, as INFO records of the ``trainpatterns.train`` logger, so a
script's logging configuration (handlers, files, levels) receives them. With ``progress=True`` and
a logging setup that would not show INFO records (Python's default), the lines are written to stdout
through tqdm instead, above the bar, so that the bar still comes with its figures.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Sequence

from tqdm.auto import tqdm

__all__ = ["Progress", "Speaker"]

logger = logging.getLogger("trainpatterns.train")


def _logging_shows_info() -> bool:
    """Whether an INFO record of ``logger`` reaches a handler (logging is set up to show it)."""
    return logger.isEnabledFor(logging.INFO) and logger.hasHandlers()


class Speaker:
    """Says one line on rank 0: logged, or written above the bar when ``console`` and logging
    would not show it."""

    def __init__(self, rank: int, console: bool) -> None:
        self.rank = rank
        self.console = console

    def __call__(self, line: str) -> None:
        if self.rank != 0:
            return
        if self.console and not _logging_shows_info():
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            logger.info(line)


def summary(record: dict, num_epochs: int, metric_names: Sequence[str]) -> str:
    """The one-line summary of a virtual epoch's record."""
    parts = [f"epoch {record['epoch']}/{num_epochs}", f"step {record['step']}"]
    parts += [f"{k} {record[k]:.4g}" for k in ("train_loss", "val_loss", *metric_names, "max_error") if k in record]
    parts += [f"lr {record['lr']:.3g}"] if "lr" in record else []
    parts += [f"{record['samples_per_s']:,.0f} samples/s"]
    return "  ".join(parts) + ("  *best" if record["best"] else "")


class Progress:
    """The tqdm bar over the plan's steps (rank 0 with ``progress=True``; else it does nothing):
    the running loss, samples/s, the virtual epoch, and the last epoch's validation figures."""

    def __init__(self, enabled: bool, total: int, initial: int, world: int, num_epochs: int,
                 shown_keys: Sequence[str]) -> None:
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train",
                        leave=True) if enabled else None
        self.world = world
        self.num_epochs = num_epochs
        self.shown_keys = tuple(shown_keys)
        self.last: dict = {}

    def step(self, count: int, last: bool, loss: float, rows: int, t0: float, index: int) -> None:
        """After step ``count`` of virtual epoch ``index`` (``last``: its final step); the figures
        are refreshed on the first step, every 10th and the last."""
        if self.bar is None:
            return
        if count % 10 == 0 or last or count == 1:
            rate = rows * self.world / max(time.perf_counter() - t0, 1e-9)
            shown = {"loss": f"{loss:.4g}", "samples_s": f"{rate:,.0f}", "vepoch": f"{index + 1}/{self.num_epochs}"}
            shown.update({k: f"{self.last[k]:.4g}" for k in self.shown_keys if k in self.last})
            self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
