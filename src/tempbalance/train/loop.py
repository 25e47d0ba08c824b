"""The training loop: :func:`run_training` builds data, model and method from a :class:`TrainConfig`,
trains epoch by epoch with an atomic checkpoint and metrics each epoch, and resumes exactly (also under torchrun).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..atomic import write_json
from ..errors import ConfigError, TempBalanceError, spell
from ..progress import Progress
from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .config import NUMERICS_FIELDS, TrainConfig
from .data.loading import check_data_source
from .devices import resolve_device
from .distributed_run import DistContext, StopVote, detect_launch, distributed_context, rank_seed, summed, wrap_model
from .divergence import DivergenceError, LossWatch, check_epoch
from .methods import MethodParts, balanced_rates, balanced_weight_decays, build_method, global_lr
from .metrics import MetricsWriter
from .resume import OpenedRun, open_run
from .rundir import CONFIG_NAME, SUMMARY_NAME

__all__ = ["run_training", "resolve_device", "summary_line", "SUMMARY_NAME", "DivergenceError"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class _StopFlag:
    """Set by SIGINT/SIGTERM: the loop stops at the next batch, keeping the last checkpoint."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.agreed: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop right away
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: stopping after the current batch", signal.Signals(signum).name)

    def record(self, agreed: int) -> bool:
        """Keep the signal number the ranks agreed on (0: none); True when they stop."""
        self.agreed = agreed or None
        return self.agreed is not None

    def agree(self, ctx: DistContext) -> bool:
        """True when this or any other rank received a signal; every rank must call it at the same
        point (a collective under torchrun), so that all ranks stop together.
        ``agreed`` then holds the signal number (the largest one received)."""
        return self.record(ctx.max_int(self.signum or 0))


@contextlib.contextmanager
def _run_environment(
    config: TrainConfig, device: torch.device, stop: _StopFlag, threads: int | None = None
) -> Iterator[None]:
    """Threads (``config.num_threads``, else ``threads``, else as they are), determinism and signal
    handlers for the run; everything restored afterwards."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    handlers: dict[int, Any] = {}
    try:
        if (config.num_threads or threads) is not None:
            torch.set_num_threads(config.num_threads or threads)
        torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not config.deterministic and device.type == "cuda"
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                handlers[signum] = signal.signal(signum, stop)
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.backends.cudnn.benchmark = previous_benchmark
        torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
        torch.set_num_threads(previous_threads)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build_model(config: TrainConfig, dataset: Any, device: torch.device) -> nn.Module:
    from . import models as models_module

    info = dataset.info
    extras: dict[str, Any] = {}
    if config.model == "mlp":
        x, _ = next(iter(dataset.test_batches(1)))
        extras["in_features"] = int(x[0].numel()) // info.in_channels
    model = models_module.create_model(config.model, info.num_classes, info.in_channels, config.width, **extras)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _autocast(config: TrainConfig, device: torch.device):
    use = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _prepare(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _train_epoch(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    parts: MethodParts,
    dataset: Any,
    config: TrainConfig,
    epoch: int,
    device: torch.device,
    bar: Progress,
    stop: _StopFlag,
    ctx: DistContext,
) -> tuple[float, float] | None:
    """One epoch on this rank's shard; returns (mean loss, accuracy %) over all ranks, or None
    when a signal reached any rank (all ranks agree on the batch where they stop)."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = torch.zeros((), device=device, dtype=torch.int64)
    batches = dataset.train_batches(
        config.batch_size, epoch=epoch, seed=config.seed, augment=config.augment,
        rank=ctx.rank, world_size=ctx.world_size,
    )
    vote = StopVote(ctx)  # all ranks stop at the same batch, without a blocking round trip per batch
    for x, y in batches:
        if stop.record(vote.cast(stop.signum or 0)):
            vote.close()
            return None
        x = _prepare(x, device)
        with _autocast(config, device):
            logits = forward(x)
            loss = loss_fn(logits.float(), y)
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if parts.regularizer is not None:
            parts.regularizer.apply()
        parts.optimizer.step()
        total_loss += loss.detach().double() * y.shape[0]
        correct += (logits.detach().argmax(dim=1) == y).sum()
        seen += y.shape[0]
        bar.update(1)
    if stop.record(vote.settle(stop.signum or 0)):
        return None
    total_loss, total_correct, total_seen = summed(ctx, [total_loss, correct, seen])
    if total_seen == 0:
        raise TempBalanceError(f"epoch {epoch + 1} saw no training batch (batch_size={config.batch_size} too large?)")
    return total_loss / total_seen, 100.0 * total_correct / total_seen


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    dataset: Any,
    config: TrainConfig,
    device: torch.device,
    ctx: DistContext,
) -> tuple[float, float]:
    """(mean loss, accuracy %) on the whole test set; each rank evaluates its shard, the sums are reduced."""
    model.eval()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in dataset.test_batches(config.eval_batch_size, rank=ctx.rank, world_size=ctx.world_size):
        with _autocast(config, device):
            logits = forward(_prepare(x, device)).float()
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(dim=1) == y).sum()
        seen += y.shape[0]
    total_loss, total_correct, total_seen = summed(ctx, [total_loss, correct, seen])
    if total_seen == 0:
        raise TempBalanceError(f"the test set of {config.dataset!r} is empty")
    return total_loss / total_seen, 100.0 * total_correct / total_seen


def _layer_alphas(parts: MethodParts) -> dict[str, float]:
    if parts.balancer is None or not parts.balancer.history:
        return {}
    alphas = {entry.layer: float(entry.alpha) for entry in parts.balancer.history[-1].layers}
    return {name: (value if math.isfinite(value) else None) for name, value in alphas.items()}


def _summary(config: TrainConfig, rows: list[dict[str, Any]], status: str) -> dict[str, Any]:
    best = max(rows, key=lambda row: row["test_acc"]) if rows else None
    last = rows[-1] if rows else {}
    return {
        "status": status,
        "dataset": config.dataset,
        "model": config.model,
        "method": config.method,
        "seed": config.seed,
        "tag": config.tag,
        "lr": config.lr,
        "epochs": config.epochs,
        "epochs_done": len(rows),
        "final_test_acc": last.get("test_acc"),
        "final_test_loss": last.get("test_loss"),
        "final_train_loss": last.get("train_loss"),
        "final_train_acc": last.get("train_acc"),
        "best_test_acc": best["test_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "train_time_s": sum(row["epoch_time"] for row in rows),
    }


def run_training(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """Train one run to completion (or to ``stop_after`` / a SIGINT/SIGTERM) and return its summary.

    With ``config.out`` set, the run directory gets ``config.json`` (every resolved setting),
    ``metrics.jsonl`` / ``metrics.csv`` (one row per epoch: ``epoch``, ``lr`` (global rate used),
    ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc`` (accuracies in %), ``epoch_time`` (s)
    and, when balancing, ``alpha`` / ``layer_lr`` (and ``layer_wd`` when the weight decay is balanced) per
    layer), ``checkpoint.pt`` after every epoch
    (``checkpoint.prev.pt`` the one before), and ``summary.json`` once finished. Every file is
    replaced atomically, and the metrics are written after the epoch's checkpoint (never ahead of it).
    While it trains, the run holds the directory's lock: another process trying the same directory
    gets :class:`~tempbalance.train.runlock.RunLockedError`.

    A directory that already holds a run needs ``resume`` (continue it; a finished run is left as
    it is) or ``overwrite`` (start over). ``resume`` continues from the checkpoint with identical
    results (CPU, deterministic): the experiment's settings must equal the run's; the thread count
    is the run's own unless given; other threads, device, ``compile`` or ``deterministic`` are
    accepted with a warning (no longer bit-identical). Given as a dict with ``resume=True``,
    settings not in it are read back from the run.

    Before anything is trained, the device is checked to exist and ``data_dir`` to hold the data
    set. An epoch with a non-finite loss or weight raises :class:`DivergenceError` before its
    checkpoint is written; a training loss growing by orders of magnitude is warned about (and
    listed under ``warnings`` in the summary).

    Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set, more than one process) the
    run is data-parallel: a process group is set up (NCCL on ``cuda:LOCAL_RANK``, else gloo) and torn
    down at the end, the model is wrapped in ``DistributedDataParallel`` (same initial weights on every
    rank), each rank trains on its own shard with ``batch_size`` examples per step (the global batch
    is ``batch_size * world_size``), losses and accuracies are summed over ranks (whole training and
    test sets), and only rank 0 writes files (checkpoints hold the unwrapped model's state dict,
    loadable by a single process) and shows progress. Every rank returns the summary.

    Returns:
        The summary dict: ``status`` (``"finished"``, ``"stopped"`` at ``stop_after``, or
        ``"interrupted"`` with ``signal``), final / best test accuracy, epochs done, train time.

    Raises:
        ConfigError: a bad setting, a missing device or data set, an existing run in ``out``
            without ``resume``/``overwrite``, or a resume with other settings.
        CheckpointError: ``resume`` but no checkpoint can be read.
        RunLockedError: another process is training ``out``.
        DivergenceError: a non-finite loss or weight.
        WriteError: a file could not be written (e.g. the disk is full); it names the file.
    """
    if isinstance(config, dict):
        values = dict(config)
        resuming = values.get("resume") and values.get("out") is not None
        config = TrainConfig.for_resume(values["out"], values) if resuming else TrainConfig.from_dict(values)
    config.validate()
    launch = detect_launch()
    if launch is None:  # before any work (under torchrun: once the ranks agree on the settings)
        resolve_device(config.device)
        check_data_source(config.dataset, config.data_dir, config.download)
    stop = _StopFlag()
    with contextlib.ExitStack() as locks, distributed_context(config.device, launch) as (ctx, rank_device):
        if ctx.enabled:  # rank 0's settings: a resume read them back from rank 0's files
            config = ctx.broadcast(config)
            _on_every_rank(ctx, lambda: check_data_source(config.dataset, config.data_dir, config.download))
        out = Path(config.out) if config.out is not None else None
        device = rank_device if rank_device is not None else resolve_device(config.device)
        opened = _on_main(ctx, lambda: open_run(config, out, device, locks), share=True)
        if opened.finished is not None:
            return opened.finished
        with _run_environment(config, device, stop, opened.threads):
            return _train(config, device, out, opened, stop, ctx)


def _on_main(ctx: DistContext, work: Callable[[], Any], *, share: bool = False) -> Any:
    """Run ``work`` on rank 0 only and tell every rank whether it failed; a collective under torchrun.

    Returns ``work``'s result on rank 0; on the other ranks None, or rank 0's result with ``share``.
    When ``work`` fails every rank raises (so none waits forever for rank 0); the other ranks'
    copy of the error is marked ``shown_by_rank0`` (the CLI prints it once)."""
    result: Any = None
    failure: Exception | None = None
    if ctx.is_main:
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            failure = exc
    if not ctx.enabled:
        if failure is not None:
            raise failure
        return result
    shared_result, shared_failure = ctx.broadcast(
        (result if share and failure is None else None, None if failure is None else _portable(failure))
    )
    if failure is not None:
        raise failure
    if shared_failure is not None:
        shared_failure.shown_by_rank0 = True
        raise shared_failure
    return result if ctx.is_main else shared_result


def _on_every_rank(ctx: DistContext, work: Callable[[], Any]) -> None:
    """Run ``work`` on every rank; when it fails on any rank, every rank raises (a collective), the
    others with a TempBalanceError that names the failing rank."""
    failure: Exception | None = None
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks below
        failure = exc
    reports = ctx.gather(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    for rank, report in enumerate(reports):
        if report is not None:
            raise TempBalanceError(f"rank {rank} failed: {report}")


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a TempBalanceError with its message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable error
        return TempBalanceError(f"{type(error).__name__}: {error}")


def _restore_rng(state: dict[str, Any], ctx: DistContext) -> None:
    """Each rank's random state from the checkpoint; rank 0's when the world size changed."""
    saved_world = int(state.get("world_size", 1))
    per_rank = state.get("rng_per_rank")
    if saved_world == ctx.world_size and per_rank is not None:
        set_rng_state(per_rank[ctx.rank])
        return
    if saved_world != ctx.world_size and ctx.is_main:
        log.warning(
            "the checkpoint was written by %d process(es), resuming with %d: the global batch and the data "
            "shards change, so the run will not match an uninterrupted one", saved_world, ctx.world_size,
        )
    set_rng_state(state["rng"])
    if ctx.enabled:
        _seed_everything(rank_seed(int(state["config"]["seed"]) + int(state["epoch"]), ctx.rank))


def _write_config(out: Path, settings: dict[str, Any], device: torch.device, ctx: DistContext, dataset: Any,
                  opened: OpenedRun, start: int) -> None:
    """``config.json``: every resolved setting and the environment. A resumed run keeps the file's
    original values and appends what this continuation ran with under ``resumed``."""
    environment = {
        "torch": torch.__version__,
        "num_train": getattr(dataset, "num_train", None),
        "num_test": getattr(dataset, "num_test", None),
        "threads": torch.get_num_threads(),
        "backend": ctx.backend,
    }
    path = out / CONFIG_NAME
    written = None
    if opened.state is not None and path.is_file():
        try:
            written = json.loads(path.read_text())
        except ValueError:
            log.warning("%s is not valid JSON; writing it again from the settings", path)
    if isinstance(written, dict):
        continuation = {"epoch": start, "device": str(device), "world_size": ctx.world_size, **environment}
        if opened.changed:
            continuation["changed"] = opened.changed
        written.setdefault("resumed", []).append(continuation)
        write_json(path, written)
        return
    resolved = dict(settings, device=str(device))
    resolved["world_size"] = ctx.world_size
    resolved["global_batch_size"] = settings["batch_size"] * ctx.world_size
    resolved["environment"] = environment
    write_json(path, resolved)


def _train(
    config: TrainConfig, device: torch.device, out: Path | None, opened: OpenedRun, stop: _StopFlag, ctx: DistContext
) -> dict:
    from . import data as data_module

    state = opened.state
    dataset = data_module.load_dataset(
        config.dataset,
        config.data_dir,
        device=device,
        train_fraction=config.train_fraction,
        seed=config.seed,
        download=config.download,
    )
    _seed_everything(config.seed)  # the same initial weights on every rank
    model = _build_model(config, dataset, device)
    wrapped = wrap_model(model, ctx, device, sync_bn=config.sync_bn)
    parts = build_method(model, config)
    if ctx.enabled:  # dropout and other global-RNG draws differ per rank
        _seed_everything(rank_seed(config.seed, ctx.rank))
    forward = torch.compile(wrapped) if config.compile else wrapped
    # Evaluation runs the inner model: DDP's forward would broadcast buffers, a collective per batch.
    evaluate = forward if not ctx.enabled else (torch.compile(model) if config.compile else model)
    if ctx.enabled and config.batch_size == 1 and dataset.num_train % ctx.world_size:
        raise ConfigError(
            f"batch_size=1 with {dataset.num_train} training examples over {ctx.world_size} processes gives the "
            "ranks different numbers of steps; use batch_size >= 2"
        )
    rows: list[dict[str, Any]] = []
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        if parts.regularizer is not None:
            parts.regularizer.load_state_dict(state["regularizer"])
        _restore_rng(state, ctx)
        rows = list(state["metrics"])
        start = int(state["epoch"])
        if ctx.is_main:
            log.info("resuming %s at epoch %d of %d", out, start + 1, config.epochs)
    # Checkpoints keep the run's own values of the settings that only change the arithmetic.
    saved_config = dict(config.to_dict(), **{k: v for k, v in (opened.recorded or {}).items() if k in NUMERICS_FIELDS})
    environment = opened.environment or {"threads": torch.get_num_threads(), "device": str(device)}
    keep_previous = [opened.keep_previous]
    warnings: list[str] = list(state.get("warnings") or []) if state is not None else []  # kept across resumes
    writer = None

    def save(epoch: int) -> None:
        """Rank 0 writes the checkpoint (with every rank's random state), then the metrics; every
        rank learns whether that worked (a collective)."""
        rngs = ctx.gather(rng_state())

        def write() -> None:
            save_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT,
                    "epoch": epoch,
                    "config": saved_config,
                    "environment": environment,
                    "model": model.state_dict(),
                    "optimizer": parts.optimizer.state_dict(),
                    "scheduler": parts.scheduler.state_dict(),
                    "regularizer": parts.regularizer.state_dict() if parts.regularizer is not None else None,
                    "rng": rngs[0],
                    "rng_per_rank": rngs if ctx.enabled else None,
                    "world_size": ctx.world_size,
                    "metrics": rows,
                    "warnings": warnings,
                },
                out,
                keep_previous=keep_previous[0],
            )
            keep_previous[0] = True
            if writer is not None and epoch > 0:
                writer.write(rows)

        _on_main(ctx, write)

    if out is not None:

        def prepare() -> Any:
            _write_config(out, saved_config, device, ctx, dataset, opened, start)
            made = MetricsWriter(out)
            if state is not None:
                made.write(rows)  # the checkpoint's rows: repairs metrics that are behind or damaged
            return made

        writer = _on_main(ctx, prepare)
        if state is None:
            save(0)
    end = min(config.epochs, config.stop_after or config.epochs)
    per_epoch = dataset.len_train_batches(config.batch_size, ctx.world_size)
    status = "finished" if end == config.epochs else "stopped"
    desc = f"{config.method} {config.dataset}/{config.model} seed {config.seed}"
    watch = LossWatch(dataset.info.num_classes, [row.get("train_loss") for row in rows], next(iter(warnings), None))
    try:
        with Progress(per_epoch * max(0, end - start), desc, "batch", enabled=config.progress and ctx.is_main) as bar:
            for epoch in range(start, end):
                if stop.agree(ctx):
                    status = "interrupted"
                    break
                started = time.perf_counter()
                lr = global_lr(parts.optimizer)
                trained = _train_epoch(model, forward, parts, dataset, config, epoch, device, bar, stop, ctx)
                if trained is None:
                    status = "interrupted"
                    break
                train_loss, train_acc = trained
                rates = balanced_rates(parts.optimizer)  # as the epoch ended (an async rebalance lands mid-epoch)
                kept = f"the checkpoint of epoch {epoch} in {out}" if out is not None else None
                decays = balanced_weight_decays(parts.optimizer)
                if not math.isfinite(train_loss):
                    check_epoch(epoch + 1, {"train loss": train_loss}, model, lr=config.lr, method=config.method,
                                kept=kept)
                ctx.sync_buffers(model)  # rank 0's BatchNorm statistics everywhere: what it evaluates and saves
                test_loss, test_acc = _evaluate(model, evaluate, dataset, config, device, ctx)
                check_epoch(epoch + 1, {"train loss": train_loss, "test loss": test_loss}, model, lr=config.lr,
                            method=config.method, kept=kept)
                warning = watch.observe(epoch + 1, train_loss, config.lr) if ctx.is_main else None
                if warning:
                    warnings.append(warning)
                parts.scheduler.step()
                row: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "epoch_time": time.perf_counter() - started,
                }
                if parts.balancer is not None:
                    row["alpha"] = _layer_alphas(parts)
                    row["layer_lr"] = rates
                    if "weight_decay" in parts.balancer.balance:
                        row["layer_wd"] = decays
                rows.append(row)
                if out is not None:
                    save(epoch + 1)
                bar.milestone({"epoch": f"{epoch + 1}/{config.epochs}", "loss": f"{train_loss:.3f}",
                               "test acc": f"{test_acc:.2f}%"})
    finally:
        if writer is not None:
            writer.close()
    summary = _summary(config, rows, status)
    summary["world_size"] = ctx.world_size
    if warnings:
        summary["warnings"] = warnings
    if status == "interrupted":
        summary["signal"] = stop.agreed
        where = f"; checkpoint of epoch {len(rows)} in {out}, continue with {spell('resume')}" if out else ""
        if ctx.is_main:
            log.warning(
                "interrupted by %s during epoch %d%s", signal.Signals(stop.agreed).name, len(rows) + 1, where
            )
    elif status == "finished" and out is not None and ctx.is_main:
        write_json(out / SUMMARY_NAME, summary)
    log.debug(summary_line(summary))
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """One line: status, method, data set/model, seed, epochs done, final and best test accuracy, time."""
    def pct(value: Any) -> str:
        return "n/a" if value is None else f"{value:.2f}%"

    return (
        f"{summary['status']}: {summary['method']} on {summary['dataset']}/{summary['model']} seed {summary['seed']}, "
        f"{summary['epochs_done']}/{summary['epochs']} epochs, final test acc {pct(summary['final_test_acc'])}, "
        f"best {pct(summary['best_test_acc'])}, {summary['train_time_s']:.1f} s"
    )
