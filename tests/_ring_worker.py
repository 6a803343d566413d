"""Worker side of test_ring_all_reduce_against_the_exact_sum: one rank of a gloo job (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) that runs RingAllReduce over awkward sizes and dtypes,
checks every result itself, and writes a summary to ``OUTDIR/ring_rank{RANK}.pt``. Any failed
check raises, so a broken ring shows as a non-zero return code."""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from trainpatterns.distributed import shutdown
from trainpatterns.distributed.ring import RingAllReduce

# Relative error bound per addition of one 16-bit rounding (unit roundoff), and float32's.
_EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def main() -> None:
    outdir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    ring = RingAllReduce()
    checked, worst = 0, {n: 0.0 for n in _NAMES.values()}
    # Sizes: empty, fewer elements than ranks, odd, around chunk boundaries for 2 and 3 ranks.
    for n in (0, 1, 2, 3, 5, 16, 17, 100, 1001, 4099):
        for dtype in _EPS:
            g = torch.Generator().manual_seed(n)
            shares = [(torch.rand(n, generator=g) + 0.5).to(dtype) for _ in range(world)]  # positive: no cancellation
            mine = shares[rank].clone()
            ring.submit(mine).wait()
            everyone = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(everyone, mine)
            assert all(torch.equal(everyone[0], t) for t in everyone), f"n={n} {dtype}: ranks differ"
            exact = sum(t.double() for t in shares)
            # world - 1 additions, each rounding once (relative, positive terms): bound (1+eps)^(w-1) - 1.
            bound = (1 + _EPS[dtype]) ** (world - 1) - 1
            err = ((mine.double() - exact).abs() / exact).max().item() if n else 0.0
            assert err <= bound * 1.0001, f"n={n} {dtype}: relative error {err} > {bound}"
            if world == 2 and dtype != torch.float32:
                ref = shares[rank].clone()
                dist.all_reduce(ref)
                assert torch.equal(ref, mine), f"n={n} {dtype}: not the bits of gloo's all-reduce"
            worst[_NAMES[dtype]] = max(worst[_NAMES[dtype]], err)
            checked += 1
    try:
        ring.submit(torch.zeros(4, 4).t())
        bad = "accepted"
    except ValueError as e:
        bad = str(e)
    torch.save({"checked": checked, "max_rel_err": worst, "bad_input": bad},
               os.path.join(outdir, f"ring_rank{rank}.pt"))
    shutdown()


if __name__ == "__main__":
    main()
