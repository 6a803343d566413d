"""One rank of a Trainer run under ``torchrun --max-restarts``, for tests/test_elastic.py.

    python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 3 \\
        _elastic_worker.py RUN_DIR OUT KILLS

Trains the built-in pendulum task (a small MLP, FusedAdamW with clipping, a cosine schedule,
validation, interpolation mode) with ``Trainer(checkpoint_dir=RUN_DIR)``, which resumes from the
newest good checkpoint on every start. ``KILLS`` is ``INCARNATION:RANK:STEP,...`` (or ``-``): in
torchrun's incarnation INCARNATION (``TORCHELASTIC_RESTART_COUNT``) rank RANK SIGKILLs itself right
after optimizer step STEP, so torchrun restarts the group. Each rank appends
``incarnation rank first_step`` to ``OUT/starts.txt`` when it starts training; at the end rank 0
writes the final weights to ``OUT/final.safetensors``.
"""
import os
import signal
import sys

import torch
from safetensors.torch import save_file

from trainpatterns import Callback, Trainer, VirtualEpochs
from trainpatterns.distributed import init_from_env, shutdown
from trainpatterns.optim import FusedAdamW
from trainpatterns.pendulum import DEFAULTS, Job

STEPS, CHECKPOINTS, SAMPLES, BATCH, HIDDEN = 60, 6, 512, 32, 32


class Chaos(Callback):
    """Logs where this incarnation starts and SIGKILLs this process at its chosen step."""

    def __init__(self, out: str, kills: str, rank: int) -> None:
        self.out, self.rank = out, rank
        self.incarnation = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.kill_at = None
        for item in filter(None, kills.strip("-").split(",")):
            inc, r, step = (int(v) for v in item.split(":"))
            if inc == self.incarnation and r == rank:
                self.kill_at = step
        self.logged = False

    def on_epoch_start(self, trainer, epoch):
        if not self.logged:
            with open(os.path.join(self.out, "starts.txt"), "a") as f:
                f.write(f"{self.incarnation} {self.rank} {trainer.step}\n")
            self.logged = True

    def on_step_end(self, trainer, step, loss):
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    run_dir, out, kills = sys.argv[1:4]
    torch.set_num_threads(1)
    info = init_from_env("gloo", timeout=60)
    cfg = dict(DEFAULTS, samples=SAMPLES, hidden=HIDDEN)
    job = Job(cfg)
    torch.manual_seed(0)
    model = job.model()
    opt = FusedAdamW(model.parameters(), lr=3e-3, weight_decay=0.0, max_grad_norm=1.0)
    n = job.x.shape[0]
    plan = VirtualEpochs(n, BATCH, stop_point=(STEPS * BATCH + 0.5) / n, num_checkpoints=CHECKPOINTS)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=plan.total_steps)
    trainer = Trainer(model, job.loss_fn, opt, (job.x, job.y), (job.x_val, job.y_val), checkpoint_dir=run_dir,
                      plan=plan, scheduler=sched, callbacks=[Chaos(out, kills, info.rank)], interpolation=True,
                      progress=False, num_threads=1)
    trainer.fit()
    if info.rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "final.safetensors"))
    shutdown()


if __name__ == "__main__":
    main()
