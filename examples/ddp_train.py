"""Data-parallel training with TempBalance under torchrun (DDP): gloo on CPU, NCCL on GPUs.

A tiny CNN learns a synthetic task (noisy copies of 10 random prototype images). Every rank gets the
same per-layer learning rates; the spectra are split across ranks (tempbalance.distributed).

    python examples/ddp_train.py                                    # one process (a group of one)
    torchrun --nproc-per-node 2 examples/ddp_train.py               # CPU, 2 processes (gloo)
    torchrun --nproc-per-node 8 examples/ddp_train.py --epochs 10   # 8 GPUs of one machine (NCCL)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id job1 examples/ddp_train.py   # 2 machines
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import tempbalance
from tempbalance.distributed import distributed_analyze_layers


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 64), *block(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )


def synthetic_data(samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(samples, 3, 16, 16)``: a random class prototype plus noise (same on all ranks)."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (samples,), generator=gen)
    return 0.5 * prototypes[y] + torch.randn(samples, 3, 16, 16, generator=gen), y


def setup() -> tuple[int, int, torch.device]:
    """Join the process group that torchrun describes; one GPU per process when there are GPUs.
    Started with plain ``python`` (no ``RANK`` set), it runs as a process group of one."""
    if "RANK" not in os.environ:
        print("not started by torchrun: running as one process "
              "(for N processes: torchrun --nproc-per-node N examples/ddp_train.py)", flush=True)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # no core oversubscription
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Accuracy over the whole set, each rank scoring its share, summed across ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model.eval()
    correct = torch.zeros(2, device=x.device)
    with torch.no_grad():
        for start in range(rank * batch_size, x.shape[0], world * batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            hits = (model(xb).argmax(1) == yb).sum().float()
            correct += torch.stack([hits, torch.tensor(float(len(yb)), device=x.device)])
    model.train()
    dist.all_reduce(correct)
    return float(correct[0] / correct[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rank, world, device = setup()
    x, y = synthetic_data(args.samples + 1024, args.seed)
    x, y = x.to(device), y.to(device)
    train_x, train_y, test_x, test_y = x[: args.samples], y[: args.samples], x[args.samples :], y[args.samples :]

    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = tiny_cnn().to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(tempbalance.param_groups(model, weight_decay=5e-4), lr=args.lr, momentum=0.9)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    scheduler = tempbalance.TempBalance(model, optimizer, cosine)  # collective: every rank constructs it

    for epoch in range(args.epochs):
        order = torch.randperm(args.samples, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        mine = order[rank::world].to(device)  # this rank's shard of the epoch
        total = torch.zeros(2, device=device)
        for start in range(0, len(mine), args.batch_size):
            idx = mine[start : start + args.batch_size]
            loss = nn.functional.cross_entropy(ddp(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += torch.stack([loss.detach() * len(idx), torch.tensor(float(len(idx)), device=device)])
        lrs = scheduler.get_last_lr()  # the rates this epoch trained with
        scheduler.step()  # on every rank: the layer spectra are measured collectively
        dist.all_reduce(total)
        acc = evaluate(model, test_x, test_y, args.batch_size)  # the plain module: no DDP syncs in eval
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {float(total[0] / total[1]):.4f}  test acc {acc:.3f}  "
                  f"lr {min(lrs):.4g}..{max(lrs):.4g}", flush=True)

    # The guarantees, checked: the same rates and the same weights on every rank.
    alphas = [r.alpha for r in distributed_analyze_layers(tempbalance.find_layers(model))]
    mine_state = (scheduler.get_last_lr(), alphas, [p.detach().cpu() for p in model.parameters()])
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine_state)
    if rank == 0:
        same_lr = all(o[0] == mine_state[0] for o in everyone)
        same_alpha = all(o[1] == mine_state[1] for o in everyone)
        same_w = all(all(torch.equal(a, b) for a, b in zip(o[2], mine_state[2])) for o in everyone)
        print(f"{world} ranks: identical rates {same_lr}, identical alphas {same_alpha}, identical weights {same_w}")
        print("factors:", {k: round(v, 3) for k, v in scheduler.factors.items()})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
