"""TempBalance in an ``accelerate`` training loop: balance after ``prepare``, checkpoint, resume.

A tiny Transformer encoder on synthetic sequences, offline, on CPU (the same script runs
unchanged under ``accelerate launch`` on several processes or GPUs).
Run: ``python examples/accelerate_example.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from accelerate import Accelerator
from torch import nn

import tempbalance
from tempbalance.integrations.accelerate import attach


def build_model(vocab: int = 32, dim: int = 64) -> nn.Module:
    layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=128, dropout=0.0, batch_first=True)
    return nn.Sequential(
        nn.Embedding(vocab, dim),
        nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
        nn.Flatten(),
        nn.Linear(dim * 12, 2),
    )


def synthetic_loader(n: int = 512, length: int = 12, vocab: int = 32, batch_size: int = 32):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    labels = ((tokens == 0).sum(1) > (tokens == 1).sum(1)).long()
    data = torch.utils.data.TensorDataset(tokens, labels)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=g)


def setup(steps: int, interval: int):
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = build_model()
    optimizer = torch.optim.AdamW(tempbalance.param_groups(model, no_decay_norm_bias=True, weight_decay=0.01), lr=3e-3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=3e-4)
    loader = synthetic_loader()
    model, optimizer, cosine, loader = accelerator.prepare(model, optimizer, cosine, loader)
    # the balancer rides on the prepared objects and is registered for save_state / load_state
    balancer = attach(accelerator, model, optimizer, cosine, interval=interval)
    return accelerator, model, optimizer, balancer, loader


def train(accelerator, model, optimizer, balancer, loader, steps: int) -> float:
    loss = torch.tensor(0.0)
    done = 0
    while done < steps:
        for tokens, labels in loader:
            loss = nn.functional.cross_entropy(model(tokens), labels)
            accelerator.backward(loss)
            optimizer.step()
            balancer.step()  # in place of the base scheduler's step()
            optimizer.zero_grad()
            done += 1
            if done == steps:
                break
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--interval", type=int, default=8, help="optimizer steps between rebalances")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        accelerator, model, optimizer, balancer, loader = setup(args.steps, args.interval)
        loss = train(accelerator, model, optimizer, balancer, loader, args.steps // 2)
        accelerator.save_state(tmp)
        accelerator.print(f"step {balancer.last_epoch}: loss {loss:.3f}, state saved")

        accelerator, model, optimizer, balancer, loader = setup(args.steps, args.interval)
        accelerator.load_state(tmp)
        accelerator.print(f"restored at step {balancer.last_epoch} with {len(balancer.history)} rebalances")
        loss = train(accelerator, model, optimizer, balancer, loader, args.steps - args.steps // 2)
    accelerator.print(f"step {balancer.last_epoch}: loss {loss:.3f}; rebalanced at {[h.step for h in balancer.history]}")
    accelerator.print(f"{'layer':30s} {'alpha':>7s} {'factor':>7s} {'lr':>10s}")
    for x in balancer.history[-1].layers:
        accelerator.print(f"{x.layer:30s} {x.alpha:7.3f} {x.factor:7.3f} {x.lr:10.2e}")


if __name__ == "__main__":
    main()
