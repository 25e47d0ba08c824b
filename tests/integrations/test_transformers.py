"""Tests for tempbalance.integrations.transformers with a real ``transformers.Trainer`` (offline).

A tiny GPT-2 built from a config trains a few steps on CPU. Every step's rates are checked
against HF's linear-warmup schedule written out here times the linear map of the recorded
alphas; the last alphas against a float64 numpy SVD; resuming from a checkpoint must reproduce
the uninterrupted run.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from tests.helpers.reference import median_hill_alpha

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tempbalance.errors import ConfigError  # noqa: E402
from tempbalance.integrations.transformers import create_optimizer_and_scheduler  # noqa: E402
from tempbalance.transformer_layers import model_balancing  # noqa: E402

LR = 1e-3
STEPS = 6
WARMUP = 2
INTERVAL = 2


def _linear_schedule(step: int) -> float:
    """HF's get_linear_schedule_with_warmup, re-derived."""
    if step < WARMUP:
        return step / WARMUP
    return max(0.0, (STEPS - step) / (STEPS - WARMUP))


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, length: int = 16):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 128, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class RecordRates(transformers.TrainerCallback):
    """The rates set for the next step, by group name, after every optimizer step."""

    def __init__(self):
        self.rates: dict[int, dict[str, float]] = {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.rates[state.global_step] = {g["name"]: float(g["lr"]) for g in optimizer.param_groups}


def _args(out, **kwargs):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=WARMUP, save_strategy="steps", save_steps=3,
        report_to="none", use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, **kwargs,
    )


def _train(out, resume=None, **tb_options):
    model = _gpt2()
    args = _args(out)
    optimizer, scheduler = create_optimizer_and_scheduler(model, args, STEPS, interval=INTERVAL, **tb_options)
    recorder = RecordRates()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(),
                                   optimizers=(optimizer, scheduler), callbacks=[recorder])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return model, optimizer, scheduler, recorder


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, _train(out)


def test_rates_are_schedule_times_factor_every_step(full_run):
    _, (model, optimizer, scheduler, recorder) = full_run
    assert [h.step for h in scheduler.history] == [0, 2, 4, 6]
    assert sorted(recorder.rates) == list(range(1, STEPS + 1))
    groups = {g["name"]: g for g in optimizer.param_groups}
    for step, rates in recorder.rates.items():
        entry = [h for h in scheduler.history if h.step <= step][-1]  # the factors in force
        alphas = np.array([x.alpha for x in entry.layers])
        factors = 0.5 + (alphas - alphas.min()) / (alphas.max() - alphas.min())
        for x, factor in zip(entry.layers, factors):
            expected = LR * _linear_schedule(step) * factor
            assert rates[x.layer] == pytest.approx(expected, rel=1e-9, abs=1e-15), (step, x.layer)
        assert rates["rest"] == pytest.approx(LR * _linear_schedule(step), abs=1e-15)
    # the factors did change the rates: a spread from 0.5x to 1.5x of the schedule at step 3
    balanced = [recorder.rates[3][name] for name in scheduler.layers]
    assert min(balanced) == pytest.approx(0.5 * LR * _linear_schedule(3))
    assert max(balanced) == pytest.approx(1.5 * LR * _linear_schedule(3))
    assert set(scheduler.layers) <= set(groups)
    assert [x.factor for x in scheduler.history[1].layers] != pytest.approx([x.factor for x in scheduler.history[2].layers])


def test_last_alphas_match_numpy_svd(full_run):
    _, (model, _, scheduler, _) = full_run
    last = {x.layer: x.alpha for x in scheduler.history[-1].layers}
    for name in ("transformer.wpe", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"):
        w = model.get_submodule(name).weight.detach().numpy()
        assert last[name] == pytest.approx(median_hill_alpha(w), rel=1e-8)


def test_layer_norms_follow_their_linear(full_run):
    _, (model, optimizer, _, recorder) = full_run
    pairs = {"transformer.h.0.ln_2": "transformer.h.0.attn.c_proj", "transformer.h.1.ln_2": "transformer.h.1.attn.c_proj",
             "transformer.h.1.ln_1": "transformer.h.0.mlp.c_proj"}
    for norm, owner in pairs.items():
        norm_group = next(g for g in optimizer.param_groups if any(p is model.get_submodule(norm).weight for p in g["params"]))
        owner_group = next(g for g in optimizer.param_groups if any(p is model.get_submodule(owner).weight for p in g["params"]))
        assert norm_group["tb_layer"] == owner
        assert norm_group["weight_decay"] == 0.0 and owner_group["weight_decay"] == 0.0  # HF default: 0.0
        rates = recorder.rates[3]  # mid-run (the linear schedule ends at 0)
        assert rates[norm_group["name"]] == rates[owner_group["name"]] > 0
        assert rates[norm_group["name"]] != pytest.approx(LR * _linear_schedule(3))  # not the global rate


def test_resume_from_checkpoint_restores_factors_and_history(full_run, tmp_path):
    out, (full_model, _, full_sched, full_rec) = full_run
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "scheduler.pt").exists()
    saved = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    assert [h["step"] for h in saved["history"]] == [0, 2]
    model, _, sched, rec = _train(tmp_path, resume=str(checkpoint))
    assert [h.step for h in sched.history] == [0, 2, 4, 6]
    for a, b in zip(sched.history, full_sched.history):
        np.testing.assert_allclose([x.alpha for x in a.layers], [x.alpha for x in b.layers], rtol=1e-5)
    assert sched.factors == pytest.approx(full_sched.factors, rel=1e-5)
    for step in (4, 5, 6):
        assert rec.rates[step] == pytest.approx(full_rec.rates[step], rel=1e-5, abs=1e-12)
    for p, q in zip(model.parameters(), full_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_model_balancing_options_with_bert(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=LR,
        lr_scheduler_type="constant", report_to="none", use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True)
    optimizer, scheduler = create_optimizer_and_scheduler(model, args, 4, interval=2, **model_balancing(model))

    class Data(TokenData):
        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": int(self.ids[i, 0] % 2)}

    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), optimizers=(optimizer, scheduler))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert [h.step for h in scheduler.history] == [0, 2, 4]
    factors = scheduler.factors
    blocks = {}
    for name, f in factors.items():
        if name.startswith("bert.encoder.layer."):
            blocks.setdefault(name.split(".")[3], set()).add(round(f, 12))
    assert len(blocks) == 2 and all(len(v) == 1 for v in blocks.values())  # one factor per block
    assert all(10 ** -0.5 < f < 10 ** 0.5 for f in factors.values())  # sigmoid range, s = 1
    assert len(set(round(f, 9) for f in factors.values())) > 1
    norm_group = next(g for g in optimizer.param_groups
                      if any(p is model.bert.encoder.layer[0].output.LayerNorm.weight for p in g["params"]))
    assert norm_group["tb_layer"] == "bert.encoder.layer.0.output.dense"
    assert norm_group["lr"] == pytest.approx(LR * factors["bert.encoder.layer.0.output.dense"])


def test_bad_arguments(tmp_path):
    model = _gpt2()
    args = _args(tmp_path)
    with pytest.raises(ConfigError, match="num_training_steps=0"):
        create_optimizer_and_scheduler(model, args, 0)
    with pytest.raises(ConfigError, match="interval=0"):
        create_optimizer_and_scheduler(model, args, 6, interval=0)
    plateau = transformers.TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="reduce_lr_on_plateau",
                                             eval_strategy="steps", report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match="reduce_lr_on_plateau"):
        create_optimizer_and_scheduler(model, plateau, 6)


def test_balance_weight_decay_passes_through(tmp_path):
    model = _gpt2()
    args = _args(tmp_path, weight_decay=0.01)
    optimizer, scheduler = create_optimizer_and_scheduler(model, args, STEPS, interval=INTERVAL, balance="weight_decay")
    entry = scheduler.history[-1]
    alphas = np.array([x.alpha for x in entry.layers])
    decays = dict(zip(scheduler.layers, 0.01 * np.interp(alphas, [alphas.min(), alphas.max()], [0.5, 1.5])))
    for group in optimizer.param_groups:
        if group["name"].endswith("no_decay"):
            assert group["weight_decay"] == 0.0  # biases and norms stay without decay
        elif "tb_layer" in group:
            assert group["weight_decay"] == pytest.approx(decays[group["tb_layer"]], rel=1e-9)
    modules = dict(model.named_modules())
    for name in scheduler.layers:  # the recorded alphas are those of the weights, re-derived here
        w = modules[name].weight.detach().numpy()
        assert dict(zip(scheduler.layers, alphas))[name] == pytest.approx(median_hill_alpha(w), rel=1e-8)
    assert {x.factor for x in entry.layers} == {1.0}
