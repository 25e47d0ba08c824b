"""The measurements of ``benchmarks/gpu.sh``, one subcommand per step (run as ``python benchmarks/gpu_bench.py``).

Every subcommand appends its Markdown to ``--md`` one line at a time, as each number is measured
(a step killed by its time limit keeps the rows it finished). ``make-tar`` builds the CIFAR-10 subset
tar that travels to the device machine; it needs only the standard library.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# The sizes gpu.sh uses. Every batch of the compiled run is full, so torch.compile builds exactly two
# graphs (train and eval): no recompilation for a short last batch.
TRAIN_BATCH = 128  # the harness default and the paper's
EVAL_BATCH = 500  # divides CIFAR-10's 10,000 test images
TAR_TRAIN_PER_CLASS = 2048  # 20,480 = 160 x 128 training images
TAR_TEST_PER_CLASS = 1000  # the whole test set
SYNTHETIC_TRAIN = 49_920  # 390 x 128, and a multiple of 5 (five pickle batches)
SYNTHETIC_TEST = 10_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class Markdown:
    """Append-only Markdown output: each line is written, flushed and echoed at once."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        if self.path:
            with open(self.path, "a") as handle:
                handle.write(text + "\n")

    def table(self, *columns: str) -> None:
        self.line("| " + " | ".join(columns) + " |")
        self.line("|" + "---|" * len(columns))

    def row(self, *cells: Any) -> None:
        self.line("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


# ---------------------------------------------------------------- data


def cmd_make_tar(args) -> int:
    """A class-balanced subset of an image-folder CIFAR-10 (train/<class>/, test/<class>/) as a tar,
    gzipped when the name ends in .gz or .tgz (the JPEGs share their tables: about 4.5x smaller)."""
    src = Path(args.src)
    counts = {"train": args.train_per_class, "test": args.test_per_class}
    mode = "w:gz" if args.tar.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(args.tar, mode, format=tarfile.USTAR_FORMAT) as tar:  # no per-file pax headers
        for split, n in counts.items():
            classes = sorted(p for p in (src / split).iterdir() if p.is_dir())
            if not classes:
                raise SystemExit(f"make-tar: {src / split} has no class folders")
            for cls in classes:
                files = sorted(p for p in cls.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
                if len(files) < n:
                    raise SystemExit(f"make-tar: {cls} holds {len(files)} images, fewer than {n}")
                for f in files:
                    tar.add(f, arcname=f"cifar10/{split}/{cls.name}/{f.name}")
    size = os.path.getsize(args.tar) / 2**20
    print(f"wrote {args.tar} ({size:.1f} MiB): {args.train_per_class} train and {args.test_per_class} test images per class")
    return 0


def cmd_synthetic(args) -> int:
    """A torchvision-format cifar-10-batches-py folder of random images (when no tar was carried)."""
    import numpy as np

    if args.train % 5:
        raise SystemExit(f"synthetic: --train {args.train} must be a multiple of 5 (five pickle batches)")
    rng = np.random.default_rng(0)
    folder = os.path.join(args.dir, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for i, n in enumerate([args.train // 5] * 5 + [args.test]):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    print(f"synthetic CIFAR-10 files: {args.train} train / {args.test} test random images in {folder}")
    return 0


def cmd_prepare(args) -> int:
    """Decode (and cache) the data set once, so the timed runs start from the cache."""
    from tempbalance.train.data import load_dataset

    md = Markdown(args.md)
    started = time.perf_counter()
    data = load_dataset("cifar10", args.data_dir)
    seconds = time.perf_counter() - started
    md.table("data", "train images", "test images", "load and decode (s)", "full batches")
    ragged = [f"{n} % {b} = {n % b}" for n, b in ((data.num_train, args.batch), (data.num_test, args.eval_batch)) if n % b]
    full = "yes" if not ragged else "no: " + ", ".join(ragged) + " (torch.compile will build extra graphs)"
    md.row(args.label, data.num_train, data.num_test, f"{seconds:.1f}", full)
    return 0


# ---------------------------------------------------------------- device helpers


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def describe(dev) -> str:
    import torch

    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (dry run)"


def timed(fn: Callable[[], Any], dev, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up (kernels, allocator, handles)
    times, out = [], None
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return min(times), out


def cmd_env(args) -> int:
    import torch

    import tempbalance

    dev = device()
    cuda = f", CUDA {torch.version.cuda}" if dev.type == "cuda" else ""
    print(f"torch {torch.__version__}{cuda} | {describe(dev)} | float32 matmul precision "
          f"{torch.get_float32_matmul_precision()!r} | tempbalance from {os.path.dirname(tempbalance.__file__)}")
    return 0


# ---------------------------------------------------------------- 1. device self-check


def cmd_selfcheck(args) -> int:
    """NCCL (gloo on CPU) with one rank, FSDP2 on a small ResNet, one TempBalance.rebalance()."""
    import torch
    import torch.distributed as dist

    import tempbalance
    from tempbalance.train.models import create_model

    md = Markdown(args.md)
    dev = device()
    backend = "nccl" if dev.type == "cuda" else "gloo"
    md.table("check", "result", "seconds")
    state: dict[str, Any] = {}

    def check(name: str, fn: Callable[[], str], needs: str | None = None) -> None:
        if needs is not None and needs not in state:
            md.row(name, f"skipped: needs '{needs}', which failed", "")
            return
        started = time.perf_counter()
        try:
            result = fn()
            sync(dev)
        except Exception as error:  # noqa: BLE001 - reported as the row's result
            result = f"failed: {first_line(error)}"
        else:
            state[name] = True
        md.row(name, result, f"{time.perf_counter() - started:.2f}")

    def group() -> str:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        store = os.path.join(tempfile.mkdtemp(), "store")
        kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} if dev.type == "cuda" else {}
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, **kwargs)
        t = torch.ones(4, device=dev)
        dist.all_reduce(t)
        return f"ok: {backend}, world size {dist.get_world_size()}, all_reduce sum {t.sum().item():g}"

    def shard() -> str:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        torch.manual_seed(0)
        model = create_model("resnet18", 10, 3, args.width).to(dev)
        state["plain"] = copy.deepcopy(model)
        mesh = init_device_mesh(dev.type, (1,))
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh)
        fully_shard(model, mesh=mesh)
        state["model"] = model
        sharded = sum(isinstance(p, DTensor) for p in model.parameters())
        return f"ok: ResNet18 (width {args.width:g}), {sharded} of {len(list(model.parameters()))} parameters are DTensors"

    def rebalance() -> str:
        factors = {}
        for key in ("model", "plain"):
            model = state[key]
            optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1, momentum=0.9)
            balancer = tempbalance.TempBalance(model, optimizer)
            balancer.rebalance()
            factors[key] = dict(balancer.factors)
            state[f"optimizer_{key}"] = optimizer
        ours, plain = factors["model"], factors["plain"]
        diff = max(abs(ours[k] - plain[k]) for k in plain)
        values = list(ours.values())
        return (f"ok: {len(values)} factors in [{min(values):.3f}, {max(values):.3f}]; "
                f"largest difference from the unsharded model's: {diff:.1e}")

    def train_step() -> str:
        model, optimizer = state["model"], state["optimizer_model"]
        x = torch.randn(16, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (16,), device=dev)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        return f"ok: loss {loss.item():.3f}"

    def data_path() -> str:
        import numpy as np

        from tempbalance.train.data import InMemoryDataset
        from tempbalance.train.data.registry import DATASETS

        rng = np.random.default_rng(0)
        arrays = (rng.integers(0, 256, (1000, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 1000),
                  rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 10))
        here, cpu = (InMemoryDataset(DATASETS["cifar10"], *arrays, classes=[str(i) for i in range(10)], device=d)
                     for d in (dev, "cpu"))
        worst, batches = 0.0, 0
        for (x, _), (xc, _) in zip(here.train_batches(128, epoch=1, seed=0), cpu.train_batches(128, epoch=1, seed=0)):
            assert x.device.type == dev.type, f"a batch on {x.device}"
            worst = max(worst, float((x.cpu() - xc).abs().max()))
            batches += 1
        from tempbalance.train.data.augment import draw_crop_flip

        draws = list(draw_crop_flip(torch.Generator().manual_seed(0), [128] * 7 + [104], 4, dev))
        copies = len({dy.untyped_storage().data_ptr() for dy, _, _ in draws})
        return (f"ok: {batches} augmented batches on {dev.type}, largest difference from the CPU's: {worst:.1e}; "
                f"the draws of {len(draws)} batches came in {copies} copy")

    check("in-memory data path on the device vs the CPU", data_path)
    check(f"{backend} process group (world size 1) + all_reduce", group)
    check("fully_shard (FSDP2)", shard, needs=f"{backend} process group (world size 1) + all_reduce")
    check("TempBalance.rebalance() on the sharded model vs unsharded", rebalance, needs="fully_shard (FSDP2)")
    check("one bf16 training step on the sharded model", train_step, needs="TempBalance.rebalance() on the sharded model vs unsharded")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------- 2. analysis speed


def reference_alphas(model, names: list[str]) -> dict[str, float]:
    """The reference algorithm's path: per layer, batched float32 svdvals of the
    per-kernel-position matrices scaled by sqrt(0.5), lambda = sigma^2 pooled and sorted, median Hill."""
    import torch

    modules = dict(model.named_modules())
    alphas = {}
    for name in names:
        w = modules[name].weight.detach().float()
        mats = w.permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1]) * math.sqrt(0.5) if w.dim() == 4 else w[None]
        lam = torch.sort((torch.linalg.svdvals(mats) ** 2).reshape(-1)).values
        i = lam.numel() // 2
        n = lam.numel() - i
        alphas[name] = float(1 + n / (torch.log(lam[i:]).sum() - n * torch.log(lam[i])))
    return alphas


def cmd_analysis(args) -> int:
    import torch

    import tempbalance
    from tempbalance.train.models import create_model

    md = Markdown(args.md)
    dev = device()
    md.line(f"{describe(dev)}, best of {args.repeats} (reference: {args.ref_repeats}) after a warm-up; float32 weights, median fit, Conv2d + Linear. "
            "Alpha diff: against the svdvals reference; TF32 column: tempbalance's alphas under "
            "`torch.set_float32_matmul_precision('medium')` (TF32 on CUDA, bf16 on oneDNN CPUs) against "
            "the default (0: the library forces full precision).")
    md.line()
    md.table("model", "layers", "tempbalance.analyze (ms)", "reference svdvals (ms)", "speed-up",
             "max rel. alpha diff", "alpha change under TF32")
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name, 10, 3, args.width).to(dev)
        t_ours, report = timed(lambda: tempbalance.analyze(model, fit="median"), dev, args.repeats)
        names = [r.name for r in report if math.isfinite(r.alpha)]
        ours = {r.name: r.alpha for r in report}
        saved = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("medium")
            lowered = tempbalance.analyze(model, fit="median").alphas()
        finally:
            torch.set_float32_matmul_precision(saved)
        tf32 = max((abs(lowered[k] - ours[k]) / abs(ours[k]) for k in names), default=float("nan"))
        t_ref, ref = timed(lambda: reference_alphas(model, names), dev, args.ref_repeats)
        diff = max((abs(ours[k] - ref[k]) / abs(ref[k]) for k in names), default=float("nan"))
        md.row(f"{name} (width {args.width:g})", len(names), f"{1e3 * t_ours:.1f}", f"{1e3 * t_ref:.1f}",
               f"{t_ref / t_ours:.1f}x", f"{diff:.1e}", f"{tf32:.1e}")
        del model
    return 0


# ---------------------------------------------------------------- 3. rebalance vs epoch


def cmd_rebalance(args) -> int:
    import torch

    import tempbalance
    from tempbalance.train.models import create_model

    md = Markdown(args.md)
    dev = device()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def setup(asynchronous: bool):
        torch.manual_seed(0)
        model = create_model("resnet18", 10, 3, args.width).to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(tempbalance.param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9)
        base = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)
        balancer = tempbalance.TempBalance(model, optimizer, base, asynchronous=asynchronous)

        def step() -> None:
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return balancer, step

    def steps_time(step, count: int) -> float:
        sync(dev)
        t = time.perf_counter()
        for _ in range(count):
            step()
        sync(dev)
        return time.perf_counter() - t

    steps_per_epoch = math.ceil(50_000 / args.batch)
    md.line(f"{describe(dev)}: ResNet18 (width {args.width:g}), synthetic 32x32 data, batch {args.batch}, bf16 autocast, "
            f"SGD; epoch = {steps_per_epoch} steps x the mean of {args.steps} timed steps; rebalance = best of {args.repeats}.")
    md.line()
    md.table("step (ms)", "epoch (s)", "rebalance (ms)", "rebalance / epoch")
    balancer, step = setup(False)
    steps_time(step, 3)
    t_step = steps_time(step, args.steps) / args.steps
    t_reb, _ = timed(balancer.rebalance, dev, args.repeats)
    epoch = t_step * steps_per_epoch
    md.row(f"{1e3 * t_step:.2f}", f"{epoch:.2f}", f"{1e3 * t_reb:.1f}", f"{100 * t_reb / epoch:.2f}%")
    md.line()
    md.line(f"Asynchronous mode (best of {args.repeats}): a due step() on the training thread (snapshot copy to host), "
            f"the measurement until applied with no training meanwhile, the mean step while the worker measures.")
    md.line()
    md.table("due step() on the training path (ms)", "share of an epoch", "measurement until applied (ms)",
             "step during the measurement (ms)")
    balancer, step = setup(True)
    steps_time(step, 3)
    path, worker, overlap = [], [], []
    for _ in range(args.repeats + 1):
        sync(dev)
        t = time.perf_counter()
        balancer.step()
        sync(dev)
        path.append(time.perf_counter() - t)
        balancer.wait()
        worker.append(time.perf_counter() - t)
        balancer.step()
        overlap.append(steps_time(step, args.steps) / args.steps)
        balancer.wait()
    p, w, o = min(path[1:]), min(worker[1:]), statistics.median(overlap[1:])
    md.row(f"{1e3 * p:.1f}", f"{100 * p / epoch:.3f}%", f"{1e3 * w:.1f}", f"{1e3 * o:.2f} (vs {1e3 * t_step:.2f})")
    return 0


# ---------------------------------------------------------------- 4. checkpoint analysis


def cmd_checkpoint(args) -> int:
    """A GPT-2-small-shaped Hugging Face directory (random weights), then `tempbalance analyze DIR`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    md = Markdown(args.md)
    started = time.perf_counter()
    if args.tiny:
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64)
        label = "a 2-block, 64-wide GPT-2 (dry run)"
    else:
        config = GPT2Config()  # GPT-2 small: 12 blocks, 768 wide, 50,257 tokens
        label = "GPT-2 small"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.dir)
    del model
    files = sorted(os.listdir(args.dir))
    size = sum(os.path.getsize(os.path.join(args.dir, f)) for f in files)
    md.line(f"{label}, {params / 1e6:.1f}M parameters, random init, `save_pretrained` -> {', '.join(files)} "
            f"({size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f} s. Timed: `tempbalance analyze DIR --device D` "
            "as a fresh process (start-up and reading included).")
    md.line()
    md.table("device", "exit status", "wall (s)", "layers", "result")
    for dev in args.devices:
        out_json = os.path.join(args.json_dir, f"checkpoint_{dev}.json")
        command = [sys.executable, "-c", "import sys; from tempbalance.cli import main; sys.exit(main())",
                   "analyze", args.dir, "--device", dev, "--json", out_json, "--no-progress"]
        t = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            md.row(dev, "timeout", f"{time.perf_counter() - t:.1f}", "", f"timed out after {args.timeout:g} s")
            continue
        wall = time.perf_counter() - t
        with open(os.path.join(args.json_dir, f"checkpoint_{dev}.err"), "w") as handle:
            handle.write(proc.stderr)
        if proc.returncode != 0 or not os.path.exists(out_json):
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:200].replace("|", "/")
            md.row(dev, proc.returncode, f"{wall:.1f}", "", f"failed: {last}")
            continue
        with open(out_json) as handle:
            layers = json.load(handle).get("layers", [])
        alphas = [r["alpha"] for r in layers if r.get("alpha") is not None]
        summary = f"alpha {min(alphas):.2f}-{max(alphas):.2f}" if alphas else "no alpha"
        md.row(dev, 0, f"{wall:.1f}", len(layers), summary)
    return 0


class _OverTime(Exception):
    """Raised from the progress hook when a timed analysis passes its cap."""


class _LayerClock:
    """A progress hook for ``analyze_checkpoint``: counts finished layers and stops the analysis
    (raises :class:`_OverTime`) once ``cap`` seconds have passed since ``start``."""

    def __init__(self, start: float, cap: float) -> None:
        self.start, self.cap, self.layers = start, cap, 0

    def update(self, n: int = 1) -> None:
        self.layers += n
        if time.perf_counter() - self.start > self.cap:
            raise _OverTime


def cmd_llama(args) -> int:
    """Llama-2-7B-shaped bf16 weights made on the device (no file: the disk is not what is timed), then
    the checkpoint analysis there (`analyze_checkpoint` of that state dict): the compute that issue #12
    wants in <= 30 s on a GPU, and the time per block to extrapolate to 70B."""
    import torch
    from checkpoint_analysis import SHAPES, tensor_shapes

    from tempbalance.checkpoint_analysis import analyze_checkpoint
    from tempbalance.checkpoint_files import open_checkpoint

    md = Markdown(args.md)
    dev = torch.device(args.device)
    full = SHAPES["llama7b"].scaled(16) if args.tiny else SHAPES["llama7b"]
    generator = torch.Generator(device=dev).manual_seed(0)

    def weights(blocks: int) -> dict[str, Any]:
        shapes = tensor_shapes(dataclasses.replace(full, blocks=blocks))
        return {key: torch.ones(s, dtype=torch.bfloat16, device=dev) if len(s) == 1 else
                (torch.randn(s, generator=generator, device=dev) * 0.02).to(torch.bfloat16) for key, s in shapes.items()}

    def timed(state: dict[str, Any]) -> tuple[float, int, bool]:
        sync(dev)
        start = time.perf_counter()
        clock = _LayerClock(start, args.cap)
        try:
            analyze_checkpoint(open_checkpoint(state), device=dev, progress=clock)
        except _OverTime:
            return time.perf_counter() - start, clock.layers, False
        sync(dev)
        return time.perf_counter() - start, clock.layers, True

    label = "Llama-2-7B shapes / 16 (dry run)" if args.tiny else "Llama-2-7B shapes"
    md.line(f"{label}: {full.blocks} blocks, hidden {full.hidden}, intermediate {full.intermediate}, vocab {full.vocab}; "
            f"random bf16 weights made on {describe(dev)}, analysed there by `analyze_checkpoint` (median fit; "
            f"cut at {args.cap:g} s). Goal (issue #12): 32 blocks in <= 30 s of compute on a GPU.")
    md.line()
    md.table("blocks", "layers", "seconds", "finished", "peak device memory (GB)")
    warm = {"warm.weight": torch.randn(256, 512, device=dev)}
    timed(warm)  # solver libraries and workspaces loaded
    results = {}
    for blocks in (1, full.blocks):
        state = weights(blocks)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        seconds, layers, finished = timed(state)
        peak = f"{torch.cuda.max_memory_allocated(dev) / 1e9:.1f}" if dev.type == "cuda" else "-"
        del state
        results[blocks] = (seconds, finished)
        md.row(blocks, layers, f"{seconds:.1f}", "yes" if finished else f"no: cut at {args.cap:g} s", peak)
    (one, one_done), (all_, all_done) = results[1], results[full.blocks]
    md.line()
    if one_done and all_done:
        per_block = (all_ - one) / (full.blocks - 1)
        verdict = "met" if all_ <= 30 else "missed"
        md.line(f"Per block (T({full.blocks}) - T(1)) / {full.blocks - 1} = {per_block:.2f} s; {full.blocks} blocks "
                f"{all_:.1f} s: the 30 s goal is **{verdict}**" + (" (dry-run sizes: not the goal's)" if args.tiny else "") + ".")
    else:
        md.line(f"The {full.blocks}-block analysis did not finish within {args.cap:g} s: the 30 s goal is **missed**.")
    if dev.type == "cuda":  # the other CUDA eigensolver backend, for the record (torch's default is cuSOLVER)
        md.line()
        previous = torch.backends.cuda.preferred_linalg_library()
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            timed(warm)
            seconds, layers, finished = timed(weights(full.blocks))
            md.line(f"With MAGMA (`torch.backends.cuda.preferred_linalg_library('magma')`): {full.blocks} blocks, "
                    f"{layers} layers in {seconds:.1f} s" + ("" if finished else f" (cut at {args.cap:g} s)") + ".")
        except Exception as error:  # noqa: BLE001 - a build without MAGMA: say so, keep the rows above
            md.line(f"With MAGMA: not measured ({first_line(error)}).")
        finally:
            torch.backends.cuda.preferred_linalg_library(previous)
    return 0


# ---------------------------------------------------------------- 5./6. harness runs


def cmd_train(args) -> int:
    """One harness run; writes its summary (plus timings) as JSON to --json and, with --row, a table row."""
    import torch

    from tempbalance.train import TrainConfig, run_training
    from tempbalance.train import loop

    checkpoint_times: list[float] = []
    real_save = loop.save_checkpoint

    def timed_save(*a, **k):
        t = time.perf_counter()
        out = real_save(*a, **k)
        checkpoint_times.append(time.perf_counter() - t)
        return out

    graphs: list[float] = []
    real_compile = torch.compile
    if args.compile:
        import torch._dynamo

        backend = torch._dynamo.lookup_backend(args.compile_backend)

        def counting(gm, example_inputs):
            t = time.perf_counter()
            compiled = backend(gm, example_inputs)
            graphs.append(time.perf_counter() - t)
            return compiled

        torch.compile = lambda model, **kwargs: real_compile(model, backend=counting, **kwargs)
    config = TrainConfig(dataset="cifar10", model="resnet18", width=args.width, method=args.method,
                         epochs=args.epochs, lr=args.lr, weight_decay=args.wd, seed=args.seed,
                         batch_size=args.batch, eval_batch_size=args.eval_batch, data_dir=args.data_dir,
                         out=args.out, progress=False, deterministic=False, tag=args.tag, compile=args.compile)
    loop.save_checkpoint = timed_save
    try:
        summary = run_training(config)
    finally:  # the instrumentation ends with the run
        loop.save_checkpoint, torch.compile = real_save, real_compile
    wall = time.time() - args.started if args.started else float("nan")
    with open(os.path.join(args.out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(args.out, "config.json")) as f:
        n_train = json.load(f)["environment"]["num_train"]
    epoch_times = [r["epoch_time"] for r in rows]
    steady = statistics.median(epoch_times[1:] or epoch_times)
    per_checkpoint = statistics.fmean(checkpoint_times[1:] or checkpoint_times or [0.0])
    per_epoch = steady + per_checkpoint  # what one more epoch costs the run
    summary.update(
        wall_s=wall, n_train=n_train, epoch_times=epoch_times, steady_epoch_s=steady, images_per_s=n_train / steady,
        checkpoint_s=per_checkpoint, per_epoch_s=per_epoch, fixed_s=wall - len(rows) * per_epoch,
        compiled=args.compile, graphs=len(graphs) if args.compile else None, backend_compile_s=sum(graphs),
        batch=args.batch, eval_batch=args.eval_batch,
    )
    with open(args.json, "w") as f:
        json.dump(summary, f)
    if args.row:
        compile_cell = "-"
        if args.compile:
            compile_cell = (f"{len(graphs)} graphs ({args.compile_backend}); backend {sum(graphs):.1f} s; "
                            f"epoch 1 - steady = {epoch_times[0] - steady:.1f} s")
        label = args.method + (" (torch.compile)" if args.compile else "")
        Markdown(args.md).row(
            label, f"{args.batch} / {args.eval_batch}", n_train, f"{epoch_times[0]:.2f}", f"{steady:.2f}",
            f"{n_train / steady:.0f}", f"{per_checkpoint:.2f}", f"{summary['fixed_s']:.1f}", f"{wall:.1f}", compile_cell,
        )
    return 0


def cmd_plan(args) -> int:
    """The CAL-vs-TB epoch count that fits ``--avail`` seconds, from the solo throughput runs' measured
    fixed overhead and per-epoch cost; prints the number (0: skip) and writes the reasoning to --md."""
    runs = []
    for path in args.runs:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError):
            continue
    md = Markdown(args.md)
    if not runs:
        md.line("Epoch estimate: no throughput run finished, so no measured cost to plan from.")
        print(0)
        return 0
    fixed = max(r["fixed_s"] for r in runs)
    per_epoch = max(r["per_epoch_s"] for r in runs)
    share = max(1.0, args.parallel / 2)  # assume each of N runs on the one GPU runs at 2/N of its solo speed
    usable = args.avail - args.fixed_factor * fixed - args.slack
    epochs = int(usable // (share * per_epoch * args.epoch_factor)) if usable > 0 else 0
    epochs = max(0, min(args.max_epochs, epochs))
    md.line(f"Epoch estimate: {epochs} epochs = floor(({args.avail:.0f} s left - {args.fixed_factor:g} x {fixed:.1f} s "
            f"fixed overhead - {args.slack:g} s) / ({share:g} x {per_epoch:.2f} s per epoch x {args.epoch_factor:g})), "
            f"at most {args.max_epochs}; fixed overhead and per-epoch cost (steady epoch + checkpoint) are the largest "
            f"of the solo throughput runs; {args.parallel} runs share the GPU.")
    print(epochs)
    return 0


def cmd_compare(args) -> int:
    """CAL vs TB from the comparison runs' directories (finished or not)."""
    md = Markdown(args.md)
    runs = []
    for directory in args.dirs:
        name = os.path.basename(directory.rstrip("/"))
        method, seed = name.split("_")[1], int(name.split("seed")[-1])
        summary_path = os.path.join(directory, "summary.json")
        metrics_path = os.path.join(directory, "metrics.jsonl")
        rows = []
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        status = "finished" if os.path.exists(summary_path) else ("no epoch" if not rows else "did not finish")
        runs.append({"method": method, "seed": seed, "status": status, "epochs": len(rows),
                     "acc": rows[-1]["test_acc"] if rows else None})
    md.table("run", "status", "epochs done", "last test acc %")
    for r in runs:
        acc = f"{r['acc']:.2f}" if r["acc"] is not None else "-"
        md.row(f"{r['method']} seed {r['seed']}", r["status"], r["epochs"], acc)
    done = {(r["method"], r["seed"]): r["acc"] for r in runs if r["status"] == "finished"}
    md.line()
    md.table("method", "finished runs", "final test acc % (mean ± std)")
    for method in ("cal", "tb"):
        values = [acc for (m, _), acc in done.items() if m == method]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else float("nan")
            md.row(method, len(values), f"{statistics.fmean(values):.2f} ± {std:.2f}")
        else:
            md.row(method, 0, "no finished run")
    seeds = sorted({s for (m, s) in done if m == "cal"} & {s for (m, s) in done if m == "tb"})
    if seeds:
        diffs = [done[("tb", s)] - done[("cal", s)] for s in seeds]
        md.line()
        md.line(f"Paired TB - CAL over seeds {seeds}: {statistics.fmean(diffs):+.2f} "
                f"(per seed: {', '.join(f'{d:+.2f}' for d in diffs)}).")
    return 0


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--md", help="append the Markdown to this file")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-tar")
    p.add_argument("tar")
    p.add_argument("--train-per-class", type=int, default=TAR_TRAIN_PER_CLASS)
    p.add_argument("--test-per-class", type=int, default=TAR_TEST_PER_CLASS)
    p.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"))
    p = sub.add_parser("synthetic")
    p.add_argument("--dir", required=True)
    p.add_argument("--train", type=int, default=SYNTHETIC_TRAIN)
    p.add_argument("--test", type=int, default=SYNTHETIC_TEST)
    p = sub.add_parser("prepare")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--label", default="cifar10")
    p.add_argument("--batch", type=int, default=TRAIN_BATCH)
    p.add_argument("--eval-batch", type=int, default=EVAL_BATCH)
    sub.add_parser("env")
    p = sub.add_parser("selfcheck")
    p.add_argument("--width", type=float, default=0.25)
    p = sub.add_parser("analysis")
    p.add_argument("--models", nargs="+", default=["resnet18", "vgg16", "wrn28-6"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ref-repeats", type=int, default=1, help="timed passes of the (slow) svdvals reference")
    p = sub.add_parser("rebalance")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=TRAIN_BATCH)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("checkpoint")
    p.add_argument("--dir", required=True)
    p.add_argument("--json-dir", required=True)
    p.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--timeout", type=float, default=40)
    p = sub.add_parser("llama")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="every width / 16 (dry run)")
    p.add_argument("--cap", type=float, default=60, help="seconds after which an analysis is cut (default 60)")
    p = sub.add_parser("train")
    for name, kind, default in (("method", str, "cal"), ("epochs", int, 1), ("lr", float, 0.1), ("wd", float, 5e-4),
                                ("seed", int, 43), ("width", float, 1.0), ("tag", str, "gpu"),
                                ("batch", int, TRAIN_BATCH), ("eval_batch", int, EVAL_BATCH),
                                ("compile_backend", str, "inductor"), ("started", float, 0.0)):
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--row", action="store_true", help="append a throughput table row to --md")
    p = sub.add_parser("plan")
    p.add_argument("runs", nargs="*")
    p.add_argument("--avail", type=float, required=True)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--max-epochs", type=int, default=40)
    p.add_argument("--fixed-factor", type=float, default=1.5)
    p.add_argument("--epoch-factor", type=float, default=1.2)
    p.add_argument("--slack", type=float, default=15)
    p = sub.add_parser("compare")
    p.add_argument("dirs", nargs="*")
    args = parser.parse_args(argv)
    commands = {"make-tar": cmd_make_tar, "synthetic": cmd_synthetic, "prepare": cmd_prepare, "env": cmd_env,
                "selfcheck": cmd_selfcheck, "analysis": cmd_analysis, "rebalance": cmd_rebalance,
                "checkpoint": cmd_checkpoint, "llama": cmd_llama, "train": cmd_train, "plan": cmd_plan, "compare": cmd_compare}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
