"""Data-parallel training runs (torchrun / DDP) of ``tempbalance train`` on CPU with gloo and 2 processes.

The multi-process test runs this file as a worker script (``--worker``) in two processes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from tempbalance.errors import ConfigError
from tempbalance.train import TrainConfig, run_training
from tempbalance.train.checkpoint import load_checkpoint
from tempbalance.train.distributed_run import (
    DistContext,
    Launch,
    StopVote,
    _device_for,
    detect_launch,
    rank_seed,
    wrap_model,
)
from tests.helpers.workers import free_port, run_workers

WORLD = 2
WORKER_TIMEOUT_S = 150
INTERRUPT_EPOCH, INTERRUPT_BATCH = 1, 2  # rank 1 alone gets SIGTERM at this (0-based) epoch and batch


# mnist1d (10% of its 4000 training examples: 400, over 2 ranks), cnn1d at half width (3 balanced
# convs), TempBalance, 2 epochs of 7 steps per rank; the whole test set (1000 examples).
SETTINGS = dict(
    dataset="mnist1d", model="cnn1d", width=0.5, train_fraction=0.1, method="tb", epochs=2, lr=0.1,
    batch_size=32, seed=11, device="cpu", progress=False, num_threads=1,
)
BATCH = SETTINGS["batch_size"]


def ddp_config(out: Path, **overrides) -> TrainConfig:
    return TrainConfig(**dict(SETTINGS, out=str(out), **overrides))


# ---------------------------------------------------------------- the worker (one process per rank)


def _worker(outdir: Path, ports: list[str]) -> None:
    """Three runs: uninterrupted; interrupted by a SIGTERM to rank 1 only; resumed through the CLI.
    Saves per rank: summaries, final weights, how often this rank wrote metrics / checkpoints,
    and what the CLI printed."""
    import contextlib
    import io

    from tempbalance.cli import main as cli_main
    from tempbalance.train import data as data_module
    from tempbalance.train import loop

    rank = int(os.environ["RANK"])
    captured: dict[str, torch.nn.Module] = {}
    counts = {"metrics_writers": 0, "checkpoints": 0}
    build_method, writer_cls, save = loop.build_method, loop.MetricsWriter, loop.save_checkpoint

    def capture_model(model, config):  # the (unwrapped) model the method is built on
        captured["model"] = model
        return build_method(model, config)

    def counting_writer(*args, **kwargs):
        counts["metrics_writers"] += 1
        return writer_cls(*args, **kwargs)

    def counting_save(*args, **kwargs):
        counts["checkpoints"] += 1
        return save(*args, **kwargs)

    loop.build_method, loop.MetricsWriter, loop.save_checkpoint = capture_model, counting_writer, counting_save

    def final_weights() -> dict[str, torch.Tensor]:
        return {key: value.detach().clone() for key, value in captured["model"].state_dict().items()}

    results: dict = {}
    os.environ["MASTER_PORT"] = ports[0]
    results["full"] = run_training(ddp_config(outdir / "full"))
    results["full_weights"] = final_weights()
    results["full_counts"] = dict(counts)

    load_dataset = data_module.load_dataset
    taken: dict[int, int] = {}  # epoch -> batches this rank took from the data

    def load_and_signal(*args, **kwargs):
        dataset = load_dataset(*args, **kwargs)
        train_batches = dataset.train_batches

        def batches(*b_args, **b_kwargs):
            for index, batch in enumerate(train_batches(*b_args, **b_kwargs)):
                if rank == 1 and b_kwargs["epoch"] == INTERRUPT_EPOCH and index == INTERRUPT_BATCH:
                    os.kill(os.getpid(), signal.SIGTERM)
                taken[b_kwargs["epoch"]] = index + 1
                yield batch

        dataset.train_batches = batches
        return dataset

    data_module.load_dataset = load_and_signal
    os.environ["MASTER_PORT"] = ports[1]
    results["part"] = run_training(ddp_config(outdir / "part"))
    results["part_taken"] = dict(taken)
    results["batches_per_epoch"] = len(list(load_dataset(
        "mnist1d", None, train_fraction=SETTINGS["train_fraction"], seed=SETTINGS["seed"]
    ).train_batches(BATCH, epoch=0, seed=0, rank=rank, world_size=WORLD)))
    data_module.load_dataset = load_dataset

    os.environ["MASTER_PORT"] = ports[2]
    printed = io.StringIO()
    if rank == 1:  # as on a machine without the run's files: rank 0's settings reach it
        from tempbalance.train import rundir

        rundir.recorded_settings = lambda directory: None
    with contextlib.redirect_stdout(printed):  # --out and --resume alone: the settings are read back
        results["resumed_exit"] = cli_main(["train", "--out", str(outdir / "part"), "--resume", "--no-progress"])
    results["resumed_stdout"] = printed.getvalue()
    results["resumed_weights"] = final_weights()
    torch.save(results, outdir / f"rank{rank}.pt")


def _run_workers(outdir: Path) -> list[dict]:
    """Run this file as ``WORLD`` gloo worker processes; return each rank's saved results."""
    return run_workers(__file__, outdir, WORLD, WORKER_TIMEOUT_S, [str(free_port()) for _ in range(3)])


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    outdir = tmp_path_factory.mktemp("ddp")
    return outdir, _run_workers(outdir)


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], label: str) -> None:
    assert a.keys() == b.keys(), label
    for key in a:
        assert torch.equal(a[key], b[key]), f"{label}: {key} differs"


def _single_process_eval(out: Path) -> tuple[int, float, int]:
    """(correct, summed cross-entropy, count) of the saved checkpoint over the whole test set, one process."""
    from tempbalance.train.data import load_dataset
    from tempbalance.train.models import create_model

    state = load_checkpoint(out)
    dataset = load_dataset("mnist1d", None, device="cpu", seed=state["config"]["seed"])
    model = create_model("cnn1d", 10, in_channels=1, width=SETTINGS["width"])
    model.load_state_dict(state["model"])  # plain keys: the unwrapped model was saved
    model.eval()
    with torch.no_grad():
        logits = model(dataset.normalize(dataset.x_test)).double()
    loss = torch.nn.functional.cross_entropy(logits, dataset.y_test, reduction="sum")
    correct = int((logits.argmax(dim=1) == dataset.y_test).sum())
    return correct, float(loss), dataset.num_test


# ---------------------------------------------------------------- 2-process runs


def test_both_ranks_end_with_identical_weights_saved_unwrapped(ddp_runs):
    outdir, ranks = ddp_runs
    _assert_same_weights(ranks[0]["full_weights"], ranks[1]["full_weights"], "rank 0 vs rank 1")
    saved = load_checkpoint(outdir / "full")
    assert saved["epoch"] == 2 and saved["world_size"] == WORLD
    _assert_same_weights(saved["model"], ranks[0]["full_weights"], "checkpoint vs rank 0")
    assert all(not key.startswith("module.") for key in saved["model"])
    for rank in ranks:
        assert rank["full"]["status"] == "finished" and rank["full"]["world_size"] == WORLD
        assert rank["full"]["final_test_acc"] == ranks[0]["full"]["final_test_acc"]


def test_only_rank0_writes_and_config_logs_the_global_batch(ddp_runs):
    outdir, ranks = ddp_runs
    assert ranks[0]["full_counts"] == {"metrics_writers": 1, "checkpoints": 3}  # epochs 0, 1, 2
    assert ranks[1]["full_counts"] == {"metrics_writers": 0, "checkpoints": 0}
    config = json.loads((outdir / "full" / "config.json").read_text())
    assert config["world_size"] == WORLD and config["batch_size"] == BATCH
    assert config["global_batch_size"] == WORLD * BATCH
    assert json.loads((outdir / "full" / "summary.json").read_text())["status"] == "finished"
    rows = [json.loads(line) for line in (outdir / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[-1]["alpha"] and rows[-1]["layer_lr"]  # TempBalance balanced layers under DDP


def test_metrics_cover_the_whole_test_and_train_sets(ddp_runs):
    outdir, _ = ddp_runs
    rows = [json.loads(line) for line in (outdir / "full" / "metrics.jsonl").read_text().splitlines()]
    correct, loss_sum, count = _single_process_eval(outdir / "full")
    assert rows[-1]["test_acc"] == pytest.approx(100.0 * correct / count, abs=1e-9)
    assert rows[-1]["test_loss"] == pytest.approx(loss_sum / count, rel=1e-5)
    num_train = json.loads((outdir / "full" / "config.json").read_text())["environment"]["num_train"]
    for row in rows:  # sum of correct over both shards / every training example: a whole count
        hits = row["train_acc"] * num_train / 100.0
        assert abs(hits - round(hits)) < 1e-6, row["train_acc"]


def test_sigterm_on_one_rank_stops_all_ranks_at_the_same_batch(ddp_runs):
    _, ranks = ddp_runs
    for rank in ranks:  # rank 0 never received a signal: it learnt of it through the agreement
        part = rank["part"]
        assert part["status"] == "interrupted" and part["signal"] == signal.SIGTERM
        assert part["epochs_done"] == INTERRUPT_EPOCH
    assert ranks[0]["part_taken"] == ranks[1]["part_taken"]  # the same batch on both ranks
    stopped_at = ranks[0]["part_taken"][INTERRUPT_EPOCH]
    assert INTERRUPT_BATCH < stopped_at < ranks[0]["batches_per_epoch"]  # mid-epoch, after the signal


def test_resume_under_two_processes_matches_the_uninterrupted_run(ddp_runs):
    outdir, ranks = ddp_runs
    for rank, result in enumerate(ranks):
        assert result["resumed_exit"] == 0
        _assert_same_weights(result["resumed_weights"], ranks[0]["full_weights"], f"rank {rank} resumed vs full")
    full = [json.loads(line) for line in (outdir / "full" / "metrics.jsonl").read_text().splitlines()]
    part = [json.loads(line) for line in (outdir / "part" / "metrics.jsonl").read_text().splitlines()]
    drop = lambda rows: [{k: v for k, v in row.items() if k != "epoch_time"} for row in rows]  # noqa: E731
    assert drop(part) == drop(full)
    _assert_same_weights(load_checkpoint(outdir / "part")["model"], load_checkpoint(outdir / "full")["model"], "files")
    assert ranks[0]["resumed_stdout"].startswith("finished: tb on mnist1d/cnn1d") and ranks[1]["resumed_stdout"] == ""


# ---------------------------------------------------------------- in process


def test_detect_launch_reads_torchrun_variables():
    assert detect_launch({}) is None
    assert detect_launch({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None  # one process
    assert detect_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(3, 4, 1)
    assert detect_launch({"RANK": "1", "WORLD_SIZE": "2"}) == Launch(1, 2, 0)
    with pytest.raises(ConfigError, match=r"RANK='x'.*integer"):
        detect_launch({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match=r"RANK=2, WORLD_SIZE=2"):
        detect_launch({"RANK": "2", "WORLD_SIZE": "2"})


def test_single_process_context_is_local():
    ctx = DistContext()
    assert not ctx.enabled and ctx.is_main
    values = torch.tensor([1.5, 2.0], dtype=torch.float64)
    assert torch.equal(ctx.sum(values), values)
    assert ctx.max_int(15) == 15 and ctx.broadcast({"a": 1}) == {"a": 1} and ctx.gather(3) == [3]
    vote = StopVote(ctx)
    assert vote.cast(0) == 0 and vote.cast(15) == 15 and vote.settle(2) == 2 and vote.close() == 0


def test_rank_devices_and_sync_bn_rules():
    launch = Launch(rank=1, world_size=2, local_rank=1)
    assert _device_for("cpu", launch) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device='mps' under torchrun: accepted are cpu"):
        _device_for("mps", launch)
    if torch.cuda.device_count() >= 2:
        assert _device_for("auto", launch) == torch.device("cuda", 1)
        with pytest.raises(ConfigError, match=r"device='cuda:0' under torchrun: each process uses cuda:LOCAL_RANK"):
            _device_for("cuda:0", launch)
    elif not torch.cuda.is_available():
        assert _device_for("auto", launch) == torch.device("cpu")
        with pytest.raises(ConfigError, match=r"device='cuda' but CUDA is not available"):
            _device_for("cuda", launch)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert wrap_model(model, DistContext(), torch.device("cpu"), sync_bn=True) is model  # one process: unchanged
    with pytest.raises(ConfigError, match=r"sync_bn=True needs CUDA devices.*cpu"):
        wrap_model(model, DistContext(rank=0, world_size=2), torch.device("cpu"), sync_bn=True)


def test_rank_seeds_differ_per_rank_and_repeat():
    seeds = {rank_seed(43, rank) for rank in range(8)}
    assert len(seeds) == 8 and rank_seed(43, 1) == rank_seed(43, 1) and all(0 <= s < 2**63 for s in seeds)


def test_sync_bn_is_a_checked_switch_and_old_checkpoints_still_resume(tmp_path):
    with pytest.raises(ConfigError, match=r"sync_bn='yes' must be true or false"):
        ddp_config(tmp_path / "x", sync_bn="yes").validate()
    out = tmp_path / "old"
    run_training(ddp_config(out, method="cal", epochs=2, stop_after=1))
    state = load_checkpoint(out)
    del state["config"]["sync_bn"]  # a run saved before the field existed
    torch.save(state, out / "checkpoint.pt")
    assert run_training(ddp_config(out, method="cal", epochs=2, resume=True))["status"] == "finished"
    with pytest.raises(ConfigError, match=r"sync_bn: False -> True"):
        run_training(ddp_config(tmp_path / "old", method="cal", epochs=3, resume=True, sync_bn=True))


# ---------------------------------------------------------------- error lines of several ranks


class _Writes:
    """A stand-in for sys.stderr that records each write call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        """Nothing buffered."""


def test_each_ranks_error_is_one_write_with_its_rank(monkeypatch):
    """Two ranks printing at once cannot run their lines together: each line is one write call
    carrying its newline, and says which rank it comes from."""
    from tempbalance.cli import main as cli_main

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert cli_main(["train", "--dataset", "nope"]) == 2
    assert len(stderr.calls) == 1
    assert stderr.calls[0].startswith("tempbalance: error: [rank 1/2] unknown dataset 'nope'")
    assert stderr.calls[0].endswith("\n") and stderr.calls[0].count("\n") == 1


def test_an_error_rank0_shares_is_printed_by_rank0_only(monkeypatch):
    """An error rank 0 hands to every rank (e.g. "already holds a run") is printed once, by rank 0;
    every rank exits with its status."""
    import tempbalance.train
    from tempbalance.cli import main as cli_main

    def shared_failure(config):
        error = ConfigError("runs/x already holds a run")
        error.shown_by_rank0 = True
        raise error

    monkeypatch.setattr(tempbalance.train, "run_training", shared_failure)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        stderr = _Writes()
        monkeypatch.setattr(sys, "stderr", stderr)
        assert cli_main(["train", "--dataset", "mnist1d"]) == 2
        assert len(stderr.calls) == lines


def test_two_ranks_failing_together_print_two_whole_lines(tmp_path):
    """As torchrun runs them: two processes, one shared stderr, both refusing the same bad setting."""
    import subprocess

    log = tmp_path / "stderr.txt"
    with open(log, "w") as shared:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tempbalance.cli", "train", "--dataset", "mnist1d", "--lr", "-1"],
                env=dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), OMP_NUM_THREADS="1"),
                stdout=subprocess.DEVNULL, stderr=shared,
            )
            for rank in range(2)
        ]
        codes = [proc.wait(timeout=WORKER_TIMEOUT_S) for proc in procs]
    assert codes == [2, 2]
    lines = sorted(log.read_text().splitlines())
    assert lines == [f"tempbalance: error: [rank {r}/2] lr=-1.0 must be a finite number > 0" for r in range(2)]


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "--worker":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[2]), sys.argv[3:])
