"""Gradual unfreezing as a Trainer callback: the head trains alone first, then one more block
per ``every`` virtual epochs, with the frozen/trainable state a function of the epoch only.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Union

from torch import nn

from ..callbacks import Callback
from ._patterns import Patterns, select
from .freezing import freeze, unfreeze
from .groups import add_param_group


class GradualUnfreezing(Callback):
    """Trainer callback: train the head alone first, then unfreeze one more block every ``every``
    virtual epochs (ULMFiT's gradual unfreezing; the new head's random gradients would otherwise
    damage the pretrained features).

    ``blocks`` lists patterns in unfreezing order, nearest the head first (e.g. ``["layer4",
    "layer3", "layer2"]``). At virtual epoch ``e`` the first ``min(len(blocks), e // every)`` blocks
    are trainable and the rest frozen, a function of ``e`` only, so a resumed run is in the same
    state. At fit start every block's parameters the optimizer lacks are added to it, one group per
    block, with ``lr`` (a float or one per block; default the optimizer's default lr) times
    ``lr_decay ** (k + 1)`` for block k: frozen members of the optimizer are skipped while their
    gradient is None, and the optimizer's structure stays fixed, so checkpoints restore into it.
    """

    def __init__(self, blocks: Sequence[Patterns], every: int = 1, *, lr: Union[float, Sequence[float], None] = None,
                 lr_decay: float = 1.0, bn_eval: bool = True) -> None:
        if not blocks:
            raise ValueError("blocks is empty: list the patterns to unfreeze, nearest the head first")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (virtual epochs), got {every!r}")
        if not (lr_decay > 0 and math.isfinite(lr_decay)):
            raise ValueError(f"lr_decay must be a positive finite number, got {lr_decay}")
        if isinstance(lr, Sequence) and len(lr) != len(blocks):
            raise ValueError(f"lr has {len(lr)} values for {len(blocks)} blocks")
        self.blocks = list(blocks)
        self.every = every
        self.lr = lr
        self.lr_decay = lr_decay
        self.bn_eval = bn_eval

    def unfrozen_blocks(self, epoch: int) -> int:
        """How many blocks train during virtual epoch ``epoch``."""
        return min(len(self.blocks), max(0, epoch) // self.every)

    def on_fit_start(self, trainer: Any) -> None:
        model, opt = trainer.model, trainer.optimizer
        for k, block in enumerate(self.blocks):
            params, _ = select(model, block)
            if isinstance(self.lr, Sequence):
                lr = self.lr[k]
            else:
                lr = opt.defaults["lr"] if self.lr is None else self.lr
            add_param_group(opt, params, scheduler=getattr(trainer, "scheduler", None),
                            lr=lr * self.lr_decay ** (k + 1))
        self.apply(model, getattr(trainer, "epoch", 0))

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.apply(trainer.model, epoch)

    def apply(self, model: nn.Module, epoch: int) -> None:
        """Set the model's frozen/trainable state for virtual epoch ``epoch``."""
        n = self.unfrozen_blocks(epoch)
        for block in self.blocks[n:]:
            freeze(model, block, bn_eval=self.bn_eval)
        for block in self.blocks[:n]:
            unfreeze(model, block)
