"""``trainpatterns train`` under ``torchrun --max-restarts``, for tests/test_elastic.py.

    python -m torch.distributed.run ... _elastic_cli.py OUT KILLS -- TRAIN_ARGS...

Runs the CLI's ``train`` command unchanged, except that every Trainer it builds also gets the
``Chaos`` callback of _elastic_worker.py (SIGKILL at the chosen incarnation, rank and step) and rank
0 writes the final weights to ``OUT/final.safetensors`` after ``fit()``.
"""
import os
import sys

from safetensors.torch import save_file

from _elastic_worker import Chaos
from trainpatterns import cli, train


def main() -> int:
    out, kills, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: _elastic_cli.py OUT KILLS -- TRAIN_ARGS..."
    rank = int(os.environ.get("RANK", "0"))
    init, fit = train.Trainer.__init__, train.Trainer.fit

    def with_chaos(self, *args, callbacks=(), **kwargs):
        init(self, *args, callbacks=[*callbacks, Chaos(out, kills, rank)], **kwargs)

    def fit_and_save(self):
        history = fit(self)
        if rank == 0:
            weights = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            save_file(weights, os.path.join(out, "final.safetensors"))
        return history

    train.Trainer.__init__, train.Trainer.fit = with_chaos, fit_and_save
    return cli.main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
