"""Small models shared by the scheduler tests, and the training step they take."""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    """stem conv (first, excluded) -> three balanced convs with BN -> Linear head (last)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 32, 3, padding=1)
        self.n1 = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.n2 = nn.BatchNorm2d(32)
        self.c3 = nn.Conv2d(32, 48, 3, padding=1)
        self.n3 = nn.BatchNorm2d(48)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.n1(self.c1(x)))
        x = torch.relu(self.n2(self.c2(x)))
        x = torch.relu(self.n3(self.c3(x)))
        return self.head(x.mean((2, 3)))


BALANCED = ["c1", "c2", "c3"]


def batch(step: int, n: int = 16):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def train_step(model, optimizer, step):
    x, y = batch(step)
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def lrs_by_name(optimizer):
    return {g["name"]: float(g["lr"]) for g in optimizer.param_groups}


def perturb(model, step):
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std())


class MLP(nn.Module):
    """in -> 3 hidden 64x64 layers (the balanced ones) -> out."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.inp = nn.Linear(20, width)
        self.h1 = nn.Linear(width, width)
        self.h2 = nn.Linear(width, width)
        self.h3 = nn.Linear(width, width)
        self.out = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.inp, self.h1, self.h2, self.h3):
            x = torch.relu(layer(x))
        return self.out(x)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_1 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)
        self.ln_2 = nn.LayerNorm(dim)


class SmallTransformer(nn.Module):
    """Post-norm blocks (a LayerNorm after the Linear that writes its features)."""

    def __init__(self, dim: int = 64, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(32, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 10)


def reference_model(name: str) -> nn.Module:
    torch.manual_seed(11)
    if name == "transformer":
        return SmallTransformer()
    from tempbalance.train.models import create_model

    return create_model(name, num_classes=10, in_channels=3, width=0.25)
