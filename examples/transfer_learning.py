"""Transfer learning: pretrain a small CNN, freeze its backbone, put on a new head, train the head
on cached features, then gradually unfreeze with discriminative learning rates.

Run: python examples/transfer_learning.py
Task A (pretraining): which of 8 random 5x5 patterns sits somewhere in a noisy 12x12 image.
Task B (the target, 64 labelled images): which of 4 pattern pairs is present.
Prints what trains at each stage and the task-B test accuracy with and without pretraining.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from trainpatterns.optim import FusedAdamW
from trainpatterns.transfer import FeatureCache, freeze, param_groups, replace_head, trainable_summary, unfreeze


def images(templates, labels, seed):
    g = torch.Generator().manual_seed(seed)
    x = 0.8 * torch.randn(len(labels), 1, 12, 12, generator=g)
    pos = torch.randint(0, 8, (len(labels), 2), generator=g)
    for i, (r, c) in enumerate(pos.tolist()):
        x[i, 0, r:r + 5, c:c + 5] += templates[labels[i]]
    return x


def cnn(classes):
    features = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 16, 5, padding=2), bn1=nn.BatchNorm2d(16), act1=nn.ReLU(),
        conv2=nn.Conv2d(16, 16, 3, padding=1), bn2=nn.BatchNorm2d(16), act2=nn.ReLU(),
        pool=nn.AdaptiveMaxPool2d(1), flat=nn.Flatten()))
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(16, classes)))


def train(model, opt, x, y, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    templates = (torch.rand(8, 5, 5, generator=torch.Generator().manual_seed(0)) > 0.5).float() * 2 - 1
    ya = torch.randint(0, 8, (2000,))
    model = cnn(8)
    train(model, FusedAdamW(model.parameters(), lr=5e-3), images(templates, ya, 1), ya, steps=300)

    yb8, yt8 = torch.randint(0, 8, (64,)), torch.randint(0, 8, (1000,))
    xb, yb, xt, yt = images(templates, yb8, 2), yb8 // 2, images(templates, yt8, 3), yt8 // 2

    # 1. freeze the backbone (its BatchNorm layers stay in eval mode), new head, train it on cached features
    freeze(model, "features")
    replace_head(model, "head", nn.Linear(16, 4))
    print(trainable_summary(model, depth=2), "\n")
    cache = FeatureCache(model.features, xb, yb)
    train(model.head, FusedAdamW(model.head.parameters(), lr=2e-2), cache.features, cache.targets, steps=200)
    print(f"head on cached features : test accuracy {accuracy(model, xt, yt):.3f}")

    # 2. unfreeze the top conv block and fine-tune everything trainable with discriminative learning rates
    unfreeze(model, ["features.conv2", "features.bn2"])
    opt = FusedAdamW(param_groups(model, {"head": 1.0, "features.*2": 0.1}, base_lr=5e-3))
    train(model, opt, xb, yb, steps=100)
    print(f"+ fine-tuned conv2      : test accuracy {accuracy(model, xt, yt):.3f}")

    scratch = cnn(4)
    train(scratch, FusedAdamW(scratch.parameters(), lr=5e-3), xb, yb, steps=300)
    print(f"from scratch (64 images): test accuracy {accuracy(scratch, xt, yt):.3f}")


if __name__ == "__main__":
    main()
