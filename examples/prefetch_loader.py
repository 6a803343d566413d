"""Train from a memory-mapped array with PrefetchLoader, stopping and resuming mid-epoch exactly.

Run: python examples/prefetch_loader.py
Writes a small float32 memmap (features) and int64 labels to a temporary directory, trains a linear
classifier for a few hundred steps in endless mode (virtual epochs of 50 steps), saves the loader
position halfway, and shows that a fresh loader restored from it yields exactly the batches the
uninterrupted one did. Uses the GPU (pinned buffers, side-stream copies) when one is available.
"""
import os
import tempfile
import time

import numpy as np
import torch

from trainpatterns import PrefetchLoader


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, dim, classes = 50_000, 64, 10
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        features = np.memmap(os.path.join(tmp, "x.f32"), dtype=np.float32, mode="w+", shape=(rows, dim))
        features[:] = rng.standard_normal((rows, dim), dtype=np.float32)
        w_true = rng.standard_normal((dim, classes)).astype(np.float32)
        labels = np.argmax(features @ w_true, axis=1).astype(np.int64)

        loader = PrefetchLoader({"x": features, "y": labels}, 256, shuffle=True, seed=42, prefetch=4,
                                num_threads=2, device=device, epochs=None)
        print(f"{len(loader)} batches per epoch, device {device}")
        model = torch.nn.Linear(dim, classes).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        saved, seen = None, []
        t0 = time.perf_counter()
        for step, batch in enumerate(loader):
            loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 149:
                saved = loader.state_dict()  # position after the batches handed out so far
            if step >= 150:
                seen.append(batch["y"].cpu())
            if step % 50 == 49:
                print(f"virtual epoch {step // 50}: loss {loss.item():.3f} (data epoch {loader.epoch}, "
                      f"batch {loader.batch})")
            if step == 299:
                break
        print(f"300 steps in {time.perf_counter() - t0:.2f} s")

        resumed = PrefetchLoader({"x": features, "y": labels}, 256, shuffle=True, prefetch=4, device=device,
                                 epochs=None)
        resumed.load_state_dict(saved)
        again = [b["y"].cpu() for _, b in zip(range(len(seen)), resumed)]
        same = all(torch.equal(a, b) for a, b in zip(seen, again))
        print(f"resumed at {saved['epoch']}:{saved['batch']}: next {len(again)} batches identical: {same}")
        del loader, resumed, features


if __name__ == "__main__":
    main()
