"""A 3-rank AsyncDataParallel job for tests/test_async.py, run under ``torchrun --max-restarts``: in
the first incarnation the server dies (os._exit) once its optimizer has stepped 150 times, after its
background save of update 100 has committed; torchrun
restarts the group, whose server resumes from its checkpoint (saved every 50 updates) through
torchrun's shared store, and the job finishes. Each rank prints where it started and what it saw.
"""
import os
import sys

import torch
from torch import nn

from trainpatterns.distributed import AsyncDataParallel
from trainpatterns.optim import FusedAdamW

TOTAL, KILL_AT, SAVE_EVERY = 300, 150, 50
SERVER = []  # this process's AsyncDataParallel, once built


def optimizer(params):
    opt = FusedAdamW(params, lr=1e-3)
    first = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0

    def die(o, args, kwargs):
        state = o.state[o.param_groups[0]["params"][0]]
        if first and int(state.get("step", 0)) >= KILL_AT:
            SERVER[0].server.manager.wait()  # the save of update 100 has committed (it is written in the background)
            os._exit(9)

    opt.register_step_post_hook(die)
    return opt


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    adp = AsyncDataParallel(model, optimizer=optimizer, total_updates=TOTAL, timeout=20.0,
                            checkpoint_dir=sys.argv[1], save_every=SAVE_EVERY)
    SERVER.append(adp)
    incarnation = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if adp.is_server:  # (workers may have pushed already: the version can be ahead of the start)
        print(f"incarnation {incarnation}: server starts at version {adp.server.start_version}", flush=True)
        adp.serve()
    else:
        g = torch.Generator().manual_seed(adp.rank)
        while adp.training:
            x = torch.rand(16, 2, generator=g)
            nn.functional.mse_loss(adp(x), x.flip(1)).backward()
            adp.step(rows=16)
    adp.finish()
    print(f"incarnation {incarnation}: rank {adp.rank} ends with {adp.stats()['updates']} updates", flush=True)


if __name__ == "__main__":
    main()
