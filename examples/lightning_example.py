"""TempBalance in a Lightning fit: a tiny Transformer classifier on synthetic sequences, offline.

Rebalances every few optimizer steps on top of a per-step cosine schedule, saves a checkpoint
and resumes from it. Run: ``python examples/lightning_example.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

import tempbalance
from tempbalance.integrations.lightning import TempBalanceCallback
from tempbalance.transformer_layers import model_balancing


class SequenceClassifier(pl.LightningModule):
    """Embedding -> 2 Transformer encoder layers -> mean pool -> Linear."""

    def __init__(self, vocab: int = 32, dim: int = 64, steps: int = 100):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 2)
        self.steps = steps

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        loss = nn.functional.cross_entropy(self(tokens), labels)
        self.log("loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        # (1) one parameter group per balanced layer
        optimizer = torch.optim.AdamW(tempbalance.param_groups(self, no_decay_norm_bias=True, weight_decay=0.01), lr=3e-3)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps, eta_min=3e-4)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def synthetic_data(n: int = 512, length: int = 12, vocab: int = 32, seed: int = 0):
    """Label: whether token 0 appears more often than token 1 in the sequence."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    labels = ((tokens == 0).sum(1) > (tokens == 1).sum(1)).long()
    return torch.utils.data.TensorDataset(tokens, labels)


def make_trainer(max_epochs: int, callback: TempBalanceCallback, root: Path) -> pl.Trainer:
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(root))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--interval", type=int, default=8, help="optimizer steps between rebalances")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(synthetic_data(), batch_size=32, shuffle=True)
    steps = args.epochs * len(loader)
    module = SequenceClassifier(steps=steps)
    # (2) the callback: Model Balancing options (per-block sigmoid, fused q/k/v measured as 3 matrices)
    callback = TempBalanceCallback(interval=args.interval, **model_balancing(module))
    with tempfile.TemporaryDirectory() as tmp:
        half = max(1, args.epochs // 2)
        trainer = make_trainer(half, callback, Path(tmp))
        trainer.fit(module, loader)
        ckpt = Path(tmp) / "half.ckpt"
        trainer.save_checkpoint(ckpt)
        print(f"after {half} epoch(s): {len(callback.balancer.history)} rebalances; checkpoint saved")

        # (3) resume: a fresh module and callback pick up the factors and history from the checkpoint
        resumed = TempBalanceCallback(interval=args.interval, **model_balancing(module))
        trainer = make_trainer(args.epochs, resumed, Path(tmp))
        trainer.fit(SequenceClassifier(steps=steps), loader, ckpt_path=str(ckpt))
    balancer = resumed.balancer
    print(f"after {args.epochs} epochs: {len(balancer.history)} rebalances (steps {[h.step for h in balancer.history]})")
    print(f"{'layer':40s} {'metric':>8s} {'factor':>8s} {'lr':>10s}")
    for x in balancer.history[-1].layers:
        print(f"{x.layer:40s} {x.metric:8.3f} {x.factor:8.3f} {x.lr:10.2e}")


if __name__ == "__main__":
    main()
