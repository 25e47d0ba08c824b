"""``tempbalance analyze SOURCE``: per-layer spectral metrics of a checkpoint or an architecture.

SOURCE is a checkpoint (a ``.safetensors`` file, a Hugging Face model directory, a state dict
file, ``hf:ORG/NAME``, a ``tempbalance train`` run), analysed from its tensors alone and streamed,
or an architecture name (random init, never a download); output is a table, CSV, JSON and plots.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..analysis import AnalysisOptions, AnalysisReport, analyze_layers, layer_progress
from ..checkpoint_analysis import DEFAULT_BATCH_BYTES, AnalysisJournal, analyze_checkpoint, plan_tensors
from ..checkpoint_files import (
    CheckpointSource,
    find_state_dict,
    load_torch_file,
    open_checkpoint,
    strip_wrapper_prefixes,
)
from ..distributed import distributed_analyze_layers
from ..errors import ConfigError
from ..farms import ESD_MODES
from ..layers import CONV_MODES, find_layers
from ..powerlaw import FIT_METHODS, HILL_CONVENTIONS
from ..progress import Progress
from ..spectrum import PRECISIONS
from ..summaries import GROUP_BY, GroupSummary, block_index
from ..transformer_layers import split_fused_qkv

log = logging.getLogger(__name__)

PROGRESS_MIN_LAYERS = 20  # show progress from this many layers on (unless --no-progress)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".tar", ".safetensors")


def register(subparsers: Any) -> None:
    """Add the ``analyze`` subcommand."""
    p = subparsers.add_parser(
        "analyze",
        help="per-layer spectral (HT-SR) analysis of a model or a checkpoint",
        description=(
            "Per-layer eigenvalue spectra and power-law alphas. SOURCE is a checkpoint, analysed from its "
            "tensors alone (no architecture needed) and read one tensor at a time: a .safetensors file, a "
            "Hugging Face model directory (sharded safetensors or pytorch_model*.bin), a .pt/.pth/.bin state "
            "dict (also nested or prefixed, e.g. a tempbalance train checkpoint.pt or its run directory), or "
            "hf:ORG/NAME[@REVISION]; or an architecture name: a project model, a torchvision or a timm "
            "architecture (random init; prefix 'torchvision:' or 'timm:' to choose the library)."
        ),
    )
    p.add_argument("source", metavar="SOURCE", help="checkpoint file or directory, hf:ORG/NAME, or architecture name")
    p.add_argument("--arch", help="build this architecture and load the checkpoint into it (analyses the module)")
    p.add_argument("--num-classes", type=int, help="classes of --arch (default: read from the state dict)")
    p.add_argument("--in-channels", type=int, default=3, help="input channels of a project model (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of a randomly initialised architecture (default 0)")
    p.add_argument("--fit", default="median", choices=tuple(FIT_METHODS), help="power-law fit (default median)")
    p.add_argument("--xmin-pos", type=float, default=2, help="median fit: tail starts at N / xmin_pos (default 2)")
    p.add_argument("--hill", default="reference", choices=HILL_CONVENTIONS, help="Hill numerator (default reference)")
    p.add_argument("--filter-zeros", action="store_true", help="fit only eigenvalues above --zero-threshold")
    p.add_argument("--zero-threshold", type=float, default=1e-5, help="cut of --filter-zeros (default 1e-5)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="eigenvalue precision (default auto)")
    p.add_argument("--conv-mode", default="per_position", choices=CONV_MODES, help="conv matrices (default per_position)")
    p.add_argument("--conv-norm", type=float, default=0.5, help="eigenvalue scale of per-position conv (default 0.5)")
    p.add_argument("--esd", default="full", choices=ESD_MODES, help="full spectrum, or farms windows (default full)")
    p.add_argument("--window-rows", type=int, default=100, help="--esd farms: window rows (default 100)")
    p.add_argument("--window-q", type=float, default=2.0, help="--esd farms: window columns / rows (default 2.0)")
    p.add_argument("--windows-per-dim", type=int, default=10, help="--esd farms: windows along each side (default 10)")
    p.add_argument("--split-qkv", action="store_true",
                   help="analyse fused attention q/k/v (in_proj, c_attn, qkv, query_key_value) as three layers")
    p.add_argument("--exclude-frozen", action="store_true", help="skip layers whose weight does not require grad (modules)")
    p.add_argument("--group-by", choices=GROUP_BY,
                   help="print alpha per Transformer block or per module type (q/k/v/o, mlp ...) instead of per layer")
    p.add_argument("--csv", metavar="PATH", help="write one row per layer ('-' for stdout)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' for stdout)")
    p.add_argument("--plots", metavar="DIR", help="write an ESD plot per layer, an alpha summary and alpha vs depth")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted checkpoint analysis from the partial results kept beside --json/--csv/--plots")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle torch files that hold more than tensors (a whole pickled model): runs code from the file")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch-memory", type=float, default=DEFAULT_BATCH_BYTES / 2**20, metavar="MB",
                   help=f"checkpoints: upcast weights per batched eigen pass (default {DEFAULT_BATCH_BYTES >> 20} MB)")
    p.add_argument("--no-progress", action="store_true", help="no progress (bar or log lines)")
    p.add_argument("--device", default="cpu", help="device the spectra are computed on, e.g. cuda (default cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Open the source, analyse it, print / write the results. Returns 0."""
    if args.csv == "-" and args.json == "-":
        raise ConfigError("--csv - and --json - both write to stdout; send one of them to a file")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: must be a positive number of threads")
        torch.set_num_threads(args.threads)
    if not (math.isfinite(args.batch_memory) and args.batch_memory > 0):
        raise ConfigError(f"--batch-memory {args.batch_memory}: must be a positive number of MB")
    options = AnalysisOptions(
        fit=args.fit,
        xmin_pos=args.xmin_pos,
        hill=args.hill,
        filter_zeros=args.filter_zeros,
        zero_threshold=args.zero_threshold,
        precision=args.precision,
        conv_mode=args.conv_mode,
        conv_norm=args.conv_norm,
        keep_eigenvalues=bool(args.plots),
        esd=args.esd,
        window_rows=args.window_rows,
        window_q=args.window_q,
        windows_per_dim=args.windows_per_dim,
    )
    journal = journal_path(args)
    if args.resume and journal is None:
        raise ConfigError("--resume needs --json PATH, --csv PATH or --plots DIR: the partial results are kept beside it")
    with _ranks(args.device) as (ctx, device):
        source = open_source(args)
        main = ctx is None or ctx.is_main
        if isinstance(source, nn.Module):
            report = _analyze_module(source.to(device), args, options, ctx)
        else:
            report = _analyze_checkpoint(source, args, options, device, journal, ctx)
        if main:
            write_outputs(report, args)
        if main and journal is not None and not isinstance(source, nn.Module):
            AnalysisJournal(journal, {}).remove()
    return 0


@contextlib.contextmanager
def _ranks(device_name: str) -> Iterator[tuple[Any, torch.device]]:
    """``(None, device)`` for one process; under torchrun the rank's context and device."""
    from ..train.distributed_run import detect_launch, distributed_context

    launch = detect_launch()
    if launch is None:
        yield None, check_device(device_name)
        return
    with distributed_context(device_name, launch) as (ctx, device):
        yield ctx, device


def check_device(name: str) -> torch.device:
    """``torch.device(name)``, checked to exist on this machine.

    Raises:
        ConfigError: not a device string, or a device this machine does not have (names the
            devices it has).
    """
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1): {exc}") from exc
    if device.type == "cpu":
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    here = ", ".join(available_devices())
    if not available:
        raise ConfigError(f"--device {name!r}: this machine has no {device.type} device; available here: {here}")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ConfigError(f"--device {name!r}: this machine has {count()} {device.type} device(s); available here: {here}")
    return device


def available_devices() -> list[str]:
    """The device types this machine can compute on (cpu first)."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda" if torch.cuda.device_count() == 1 else f"cuda:0..{torch.cuda.device_count() - 1}")
    if torch.backends.mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found.append("xpu")
    return found


def journal_path(args: argparse.Namespace) -> Path | None:
    """Where a checkpoint analysis keeps its finished tensors: ``<--json or --csv>.partial.jsonl``,
    else ``<--plots>/partial.jsonl``; None without an output file."""
    for out in (args.json, args.csv):
        if out and out != "-":
            return Path(f"{out}.partial.jsonl")
    return Path(args.plots) / "partial.jsonl" if args.plots else None


def _progress(total: int, no_progress: bool) -> Progress:
    """A layer progress from :data:`PROGRESS_MIN_LAYERS` layers on, unless ``--no-progress``."""
    return layer_progress(total, enabled=not no_progress and total >= PROGRESS_MIN_LAYERS)


def _analyze_module(model: nn.Module, args: argparse.Namespace, options: AnalysisOptions, ctx: Any) -> AnalysisReport:
    refs = find_layers(model, split_qkv=args.split_qkv, include_frozen=not args.exclude_frozen)
    if args.split_qkv:
        refs = split_fused_qkv(refs)
    if not refs:
        raise ConfigError(f"{args.source!r} has no analysable layers (Linear, Conv, Embedding, ...)")
    measure = analyze_layers if ctx is None else distributed_analyze_layers
    with _progress(len(refs), args.no_progress or (ctx is not None and not ctx.is_main)) as bar:
        return AnalysisReport(measure(refs, options, bar), options)


def _analyze_checkpoint(
    source: CheckpointSource, args: argparse.Namespace, options: AnalysisOptions, device: torch.device,
    journal: Path | None, ctx: Any,
) -> AnalysisReport:
    if journal is not None and not args.resume:
        book = AnalysisJournal(journal, {})
        if book.files() and (ctx is None or ctx.is_main):
            log.warning("discarding the partial results in %s (pass --resume to continue them)", journal)
            book.remove()
        if ctx is not None:
            ctx.barrier()
    group = None if ctx is None else ctx.control
    total = sum(len(p.refs) for p in plan_tensors(source, split_qkv=args.split_qkv, options=options))
    try:
        with _progress(total, args.no_progress or (ctx is not None and not ctx.is_main)) as bar:
            return analyze_checkpoint(
                source, options, split_qkv=args.split_qkv, device=device,
                batch_bytes=int(args.batch_memory * 2**20), journal=journal, progress=bar, group=group,
            )
    except KeyboardInterrupt:
        if journal is not None:
            log.warning("interrupted: the finished tensors are kept in %s; run the same command with --resume "
                        "to continue", journal)
        raise


# ----------------------------------------------------------------------------- loading


def open_source(args: argparse.Namespace) -> nn.Module | CheckpointSource:
    """The model (architecture name, ``--arch``, a pickled module) or the checkpoint to stream.

    Raises:
        FileNotFoundError: ``source`` looks like a path and does not exist.
        ConfigError: an unknown architecture, a checkpoint without weights, a state dict that
            does not fit ``--arch``.
    """
    source = args.source
    if source.startswith("hf:") or os.path.exists(source):
        if args.arch is not None:
            return model_from_checkpoint(source, args.arch, args.num_classes, args.in_channels, args.allow_pickle)
        return open_checkpoint(source, allow_pickle=args.allow_pickle)
    if os.sep in source or source.endswith(CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"no such checkpoint file or directory: {source!r}")
    if args.arch is not None:
        raise ConfigError(f"--arch is for checkpoints, but {source!r} is not a file or directory")
    torch.manual_seed(args.seed)
    return build_arch(source, args.num_classes, args.in_channels)


def model_from_checkpoint(source: str, arch: str, num_classes: int | None, in_channels: int,
                          allow_pickle: bool = False) -> nn.Module:
    """Build ``arch`` and load the checkpoint's weights into it (checked to fit)."""
    if os.path.isfile(source) and not source.endswith(".safetensors"):
        found = find_state_dict(load_torch_file(Path(source), allow_pickle=allow_pickle))
        if isinstance(found, nn.Module):
            return found
        if found is None:
            raise ConfigError(f"checkpoint {source!r} holds neither a model nor a state dict")
        state = strip_wrapper_prefixes(found)
    else:
        opened = open_checkpoint(source, allow_pickle=allow_pickle)
        if isinstance(opened, nn.Module):
            return opened
        state = {info.key: shard.read(info.key) for shard in opened.shards for info in shard.tensors()}
    if num_classes is None:
        num_classes = infer_num_classes(state)
    model = build_arch(arch, num_classes, in_channels)
    check_state_dict(model, state, arch)
    model.load_state_dict(state)
    return model


def infer_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Rows of the last 2-D ``*.weight`` in the state dict (the classifier), or None."""
    for key in reversed(list(state)):
        value = state[key]
        if key.endswith("weight") and value.dim() == 2:
            return int(value.shape[0])
    return None


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    """Raise a :class:`ConfigError` naming missing / unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs arch)", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
        raise ConfigError(
            f"the state dict does not fit --arch {arch!r}: {'; '.join(parts)} "
            "(without --arch the checkpoint is analysed from its tensors alone)"
        )


def _project_models() -> tuple[tuple[str, ...], Any]:
    try:
        from ..train.models import MODEL_NAMES, create_model
    except ImportError:
        return (), None
    return tuple(MODEL_NAMES), create_model


def _torchvision_models() -> tuple[tuple[str, ...], Any]:
    try:
        import torchvision
    except ImportError:
        return (), None
    return tuple(torchvision.models.list_models()), torchvision.models.get_model


def _timm_models() -> tuple[tuple[str, ...], Any]:
    try:
        import timm
    except ImportError:
        return (), None
    return tuple(timm.list_models()), timm.create_model


def build_arch(name: str, num_classes: int | None = None, in_channels: int = 3) -> nn.Module:
    """A randomly initialised architecture: a project model, else torchvision, else timm.

    ``torchvision:NAME`` / ``timm:NAME`` choose the library. Nothing is downloaded.

    Raises:
        ConfigError: unknown name (with close matches).
    """
    library, _, bare = name.rpartition(":")
    if library not in ("", "project", "torchvision", "timm"):
        raise ConfigError(f"unknown architecture library {library!r} in {name!r}; accepted: project, torchvision, timm")
    project_names, create_project = _project_models()
    if library in ("", "project") and bare in project_names:
        return create_project(bare, num_classes if num_classes is not None else 10, in_channels=in_channels)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    tv_names, create_tv = _torchvision_models() if library in ("", "torchvision") else ((), None)
    if bare in tv_names:
        return create_tv(bare, weights=None, **kwargs)
    timm_names, create_timm = _timm_models() if library in ("", "timm") else ((), None)
    if bare in timm_names:
        return create_timm(bare, pretrained=False, **kwargs)
    libraries = {"project": project_names if library in ("", "project") else (), "torchvision": tv_names, "timm": timm_names}
    hint = _close_matches(bare, libraries)
    searched = {"": "project, torchvision or timm", "project": "project", "torchvision": "torchvision", "timm": "timm"}
    raise ConfigError(f"unknown architecture {name!r} (not a file, and not a {searched[library]} model){hint}")


def _close_matches(name: str, libraries: dict[str, tuple[str, ...]]) -> str:
    """``"; close matches: resnet18 (project, torchvision, timm), ..."``: each close name once,
    with the libraries that have it (prefix ``torchvision:`` / ``timm:`` to pick one)."""
    pool = sorted({n for names in libraries.values() for n in names})
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.5)
    if not close:
        return ""
    shown = [f"{n} ({', '.join(lib for lib, names in libraries.items() if n in names)})" for n in close]
    return f"; close matches: {', '.join(shown)}"


# ----------------------------------------------------------------------------- output


def write_outputs(report: AnalysisReport, args: argparse.Namespace) -> None:
    """CSV, JSON (each written whole to a temporary file, then renamed into place), plots and the
    table (or the group summary with ``--group-by``) on stdout unless a file goes there."""
    from ..atomic import json_safe, write_atomic

    groups = report.group_by(args.group_by) if args.group_by else None
    if args.csv:
        buffer = io.StringIO(newline="")
        report.to_csv(buffer)
        _emit(buffer.getvalue(), args.csv, write_atomic)
    if args.json:
        payload = report_payload(report, args.source)
        if groups is not None:
            payload["groups"] = {"by": args.group_by, "rows": [g.to_dict() for g in groups]}
        _emit(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n", args.json, write_atomic)
    if args.plots:
        write_plots(report, args.plots)
    if "-" not in (args.csv, args.json):
        print(format_groups(groups, args.group_by, report) if groups is not None else format_table(report))


def _emit(text: str, target: str, write: Any) -> None:
    if target == "-":
        sys.stdout.write(text)
    else:
        write(target, text)


def report_payload(report: AnalysisReport, source: str) -> dict[str, Any]:
    """The JSON document: source, options and one record per layer."""
    options = {k: v for k, v in vars(report.options).items() if k != "keep_eigenvalues"}
    return {"source": source, "options": options, "layers": report.to_records()}


def _num(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "nan"


def format_table(report: AnalysisReport) -> str:
    """A fixed-width table, one line per layer, and a summary line."""
    header = ("layer", "kind", "matrices", "eigs", "alpha", "xmin", "D", "lambda_max", "log_norm", "notes")
    rows = []
    for r in report:
        notes = []
        if r.frozen:
            notes.append("frozen")
        if r.tied_names:
            notes.append("tied: " + ",".join(r.tied_names))
        if r.reason:
            notes.append("no fit: " + r.reason)
        rows.append((
            r.name,
            r.kind,
            f"{r.num_matrices}x{r.matrix_shape[0]}x{r.matrix_shape[1]}",
            str(r.num_eigs),
            _num(r.alpha, ".3f"),
            _num(r.xmin, ".3g"),
            _num(r.ks_distance, ".3f"),
            _num(r.lambda_max, ".4g"),
            _num(r.log_norm, ".3f"),
            "; ".join(notes),
        ))
    return _render(header, rows, {3, 4, 5, 6, 7, 8}, _summary_line(report))


def _summary_line(report: AnalysisReport) -> str:
    fitted = [r.alpha for r in report if r.ok]
    mean = sum(fitted) / len(fitted) if fitted else float("nan")
    return f"{len(report)} layers, {len(fitted)} fitted (fit={report.options.fit}), mean alpha {_num(mean, '.3f')}"


def _render(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int], summary: str) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: tuple[str, ...]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in rows), summary])


def format_groups(groups: list[GroupSummary], by: str, report: AnalysisReport) -> str:
    """A fixed-width table of alpha per block or per module type, and the summary line."""
    header = (by, "layers", "fitted", "mean alpha", "median alpha", "min alpha", "max alpha")
    rows = [
        (
            "(outside blocks)" if g.group is None else str(g.group),
            str(g.layers),
            str(g.fitted),
            *(_num(v, ".3f") for v in (g.mean_alpha, g.median_alpha, g.min_alpha, g.max_alpha)),
        )
        for g in groups
    ]
    return _render(header, rows, {1, 2, 3, 4, 5, 6}, _summary_line(report))


def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "layer"


def write_plots(report: AnalysisReport, directory: str) -> None:
    """``DIR/esd_<index>_<layer>.png`` per layer, ``DIR/alpha_summary.png`` and, when layers sit in
    numbered Transformer blocks, ``DIR/alpha_depth.png`` (alpha against block, one line per module type)."""
    from .. import plots

    os.makedirs(directory, exist_ok=True)
    for index, record in enumerate(report):
        if record.eigenvalues is not None:
            plots.plot_esd(record, os.path.join(directory, f"esd_{index:03d}_{_safe_filename(record.name)}.png"))
    plots.plot_alpha_summary(list(report), os.path.join(directory, "alpha_summary.png"))
    if any(block_index(r.name) is not None for r in report):
        plots.plot_alpha_depth(list(report), os.path.join(directory, "alpha_depth.png"))
