"""Knowledge distillation: a small student learns a large teacher's softened outputs.

Run: python examples/distillation.py
Trains a teacher MLP on a synthetic 10-class task, then two students of the same small size on
only 256 labelled examples: one on the hard labels alone, one distilled from the teacher
(temperature 4, T^2-scaled KL plus cross-entropy). Prints the test accuracy of all three.
"""
import torch
import torch.nn.functional as F
from torch import nn

from trainpatterns.optim import FusedAdamW
from trainpatterns.overfit import distill


def task(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 10, generator=torch.Generator().manual_seed(99))
    return x, (torch.sin(x @ w) + 0.5 * (x @ w)).argmax(1)


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def fit(model, x, y, epochs, lr=3e-3):
    opt = FusedAdamW(model.parameters(), lr=lr)
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()


def main() -> None:
    torch.manual_seed(0)
    x, y = task(8000, 0)
    xt, yt = task(2000, 1)
    teacher = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    fit(teacher, x, y, epochs=4)
    small = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    xs, ys = x[:256], y[:256]
    torch.manual_seed(1)
    hard = small()
    fit(hard, xs, ys, epochs=60)
    torch.manual_seed(1)
    student = small()
    batches = [(x[i:i + 64], y[i:i + 64] if i < 256 else None) for i in range(0, 2048, 64)]  # labels for 256 only
    data = [(b[0], b[1]) if b[1] is not None else (b[0],) for b in batches]
    distill(teacher, student, data, FusedAdamW(student.parameters(), lr=3e-3), epochs=20, temperature=4.0, alpha=0.7)
    print(f"teacher                     : {accuracy(teacher, xt, yt):.3f}")
    print(f"student on 256 hard labels  : {accuracy(hard, xt, yt):.3f}")
    print(f"student distilled           : {accuracy(student, xt, yt):.3f}")


if __name__ == "__main__":
    main()
