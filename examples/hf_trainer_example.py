"""TempBalance with ``transformers.Trainer``: a tiny GPT-2 built from a config, offline, on CPU.

The Trainer gets TempBalance's ``(optimizer, scheduler)`` pair: AdamW on per-layer groups and
HF's linear warm-up schedule with layer factors on top, rebalanced every few steps (Model
Balancing's per-block sigmoid). Training stops half-way, then resumes from the checkpoint.
Run: ``python examples/hf_trainer_example.py`` (about ten seconds on a CPU).
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from tempbalance.integrations.transformers import create_optimizer_and_scheduler  # noqa: E402
from tempbalance.transformer_layers import model_balancing  # noqa: E402


class PatternData(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start (learnable in a few steps)."""

    def __init__(self, n: int = 256, length: int = 32, vocab: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build(output_dir: str, steps: int, interval: int):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=16, learning_rate=2e-3,
        lr_scheduler_type="linear", warmup_steps=max(1, steps // 10), weight_decay=0.01,
        save_strategy="steps", save_steps=steps // 2, logging_steps=max(1, steps // 4),
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    optimizer, scheduler = create_optimizer_and_scheduler(model, args, steps, interval=interval, **model_balancing(model))
    trainer = Trainer(model=model, args=args, train_dataset=PatternData(), optimizers=(optimizer, scheduler))
    return trainer, scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=5, help="optimizer steps between rebalances")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        trainer, scheduler = build(out, args.steps, args.interval)
        trainer.train()
        full = scheduler.factors
        checkpoint = os.path.join(out, f"checkpoint-{args.steps // 2}")

        trainer, resumed = build(out, args.steps, args.interval)
        trainer.train(resume_from_checkpoint=checkpoint)
    same = all(abs(resumed.factors[k] - v) < 1e-4 * abs(v) for k, v in full.items())
    print(f"rebalanced at steps {[h.step for h in resumed.history]}; resumed run matches the full run: {same}")
    print(f"{'layer':34s} {'alpha':>7s} {'metric':>7s} {'factor':>7s}")
    for x in resumed.history[-1].layers:
        print(f"{x.layer:34s} {x.alpha:7.3f} {x.metric:7.3f} {x.factor:7.3f}")


if __name__ == "__main__":
    main()
