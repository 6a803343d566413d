"""The Trainer's callback interface: hooks called at fixed points of ``Trainer.fit()``.

It lives in its own module so that patterns written as callbacks (gradual unfreezing in
``trainpatterns.transfer``, say) do not import the training loop, and can be driven by any loop that calls the
same hooks in the same order.

Order inside ``fit()``::

    on_fit_start(trainer)                       # before the checkpoint restore
    (restore from the checkpoint directory, callbacks' load_state_dict included)
    for each virtual epoch e (0-based, counted across resumes):
        on_epoch_start(trainer, e)
        for each step: ... on_step_end(trainer, step, loss)   # step: global, 1-based;
                                                              # loss: 0-d detached tensor
        (validation)
        on_epoch_end(trainer, e, metrics)       # metrics: dict of floats for this epoch
        (checkpoint save)
    on_fit_end(trainer)

``on_fit_start`` runs before the restore so that a callback that changes the optimizer's structure
(adds param groups) does it before the saved optimizer state is loaded into that structure. A
callback with state returns it from ``state_dict()`` (JSON-able values only) and gets it back in
``load_state_dict()``; the Trainer saves it in every checkpoint.

The attributes a callback may use on ``trainer``: ``model``, ``optimizer``, ``scheduler`` (or None),
``epoch``, ``step``, ``monitor``, ``mode``, ``rank`` (0 on the rank that speaks and writes),
``history`` (the records so far, restored ones included), ``checkpoint_dir``, ``say`` (one line to
the user), and ``stop_training`` (set it to True to end ``fit()`` after this epoch).
:class:`EarlyStopping` is the built-in one; the loggers (:mod:`trainpatterns.loggers`) are callbacks too.
"""
from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["Callback", "EarlyStopping", "callback_states", "load_callback_states"]


class Callback:
    """Base class: every hook is a no-op; override the ones you need."""

    def on_fit_start(self, trainer: Any) -> None:
        pass

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        pass

    def on_step_end(self, trainer: Any, step: int, loss: Any) -> None:
        pass

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict) -> None:
        pass

    def on_fit_end(self, trainer: Any) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EarlyStopping(Callback):
    """Stop training when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    virtual epochs in a row.

    ``mode`` (``"min"``/``"max"``) defaults to the Trainer's when ``monitor`` is the Trainer's
    monitored key, else ``"min"``. A NaN or missing-improvement epoch counts as not improving. The
    state (best value, epochs without improvement) is saved in every checkpoint, and a run that
    stopped early stays stopped when resumed. Under torchrun every rank sees the same record, so
    every rank stops at the same virtual epoch.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 3, min_delta: float = 0.0,
                 mode: Optional[str] = None) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1 (virtual epochs), got {patience!r}")
        if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min', 'max' or None, got {mode!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = mode
        self.best: Optional[float] = None
        self.wait = 0
        self.stopped_epoch: Optional[int] = None

    def on_fit_start(self, trainer: Any) -> None:
        if self.mode is None:
            self.mode = trainer.mode if self.monitor == getattr(trainer, "monitor", None) else "min"

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict) -> None:
        if self.monitor not in metrics:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, which the records do not hold "
                             f"(they hold {sorted(k for k, v in metrics.items() if isinstance(v, float))})")
        value = float(metrics[self.monitor])
        sign = 1.0 if self.mode == "min" else -1.0
        if math.isfinite(value) and (self.best is None or sign * (self.best - value) > self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch + 1
            trainer.stop_training = True
            trainer.say(f"early stopping after virtual epoch {epoch + 1}: {self.monitor} has not improved on "
                        f"{self.best} by more than {self.min_delta} for {self.patience} virtual epochs")

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait = state["best"], int(state["wait"])
        self.stopped_epoch, self.mode = state["stopped_epoch"], state["mode"]


def _keyed(callbacks: list) -> list:
    """``(key, callback)``: keys are class names (``#2`` for a second of the same class), so adding
    or reordering other callbacks does not hand one's state to another."""
    seen: dict = {}
    keys = []
    for cb in callbacks:
        name = type(cb).__name__
        seen[name] = seen.get(name, 0) + 1
        keys.append((name if seen[name] == 1 else f"{name}#{seen[name]}", cb))
    return keys


def callback_states(callbacks: list) -> dict:
    """Every callback's ``state_dict()``, keyed for :func:`load_callback_states`."""
    return {key: cb.state_dict() for key, cb in _keyed(callbacks)}


def load_callback_states(callbacks: list, state: dict) -> None:
    """Give each callback its saved state (found by key, or by position in directories that keyed
    callbacks by position); a callback absent from ``state`` keeps its own."""
    for i, (key, cb) in enumerate(_keyed(callbacks)):
        if key in state:
            cb.load_state_dict(state[key])
        elif str(i) in state:
            cb.load_state_dict(state[str(i)])
