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
``epoch``, ``step``, and ``stop_training`` (set it to True to end ``fit()`` after this epoch).
"""
from __future__ import annotations

from typing import Any

__all__ = ["Callback"]


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
