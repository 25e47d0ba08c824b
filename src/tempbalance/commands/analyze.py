"""``tempbalance analyze SOURCE``: per-layer spectral metrics of a checkpoint or an architecture.

SOURCE is a checkpoint file (a pickled module, or a state dict with ``--arch``) or an
architecture name (random init, never a download); output is a table, CSV, JSON and plots.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import re
import sys
from typing import Any

import torch
from torch import nn

from ..analysis import AnalysisOptions, AnalysisReport, analyze_layers
from ..errors import ConfigError
from ..farms import ESD_MODES
from ..layers import CONV_MODES, find_layers
from ..powerlaw import FIT_METHODS, HILL_CONVENTIONS
from ..spectrum import PRECISIONS

log = logging.getLogger(__name__)

PROGRESS_MIN_LAYERS = 20  # show a progress bar from this many layers on (unless --no-progress)
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")
STRIP_PREFIXES = ("module.", "_orig_mod.")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".tar")


def register(subparsers: Any) -> None:
    """Add the ``analyze`` subcommand."""
    p = subparsers.add_parser(
        "analyze",
        help="per-layer spectral (HT-SR) analysis of a model",
        description=(
            "Per-layer eigenvalue spectra and power-law alphas of a model. SOURCE is a checkpoint "
            "(a whole pickled module, or a state dict with --arch) or an architecture name: a project "
            "model, a torchvision or a timm architecture (random init; prefix 'torchvision:' or 'timm:' "
            "to choose the library)."
        ),
    )
    p.add_argument("source", metavar="SOURCE", help="checkpoint file or architecture name")
    p.add_argument("--arch", help="architecture of a state-dict checkpoint")
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
    p.add_argument("--split-qkv", action="store_true", help="analyse fused attention q/k/v as three layers")
    p.add_argument("--exclude-frozen", action="store_true", help="skip layers whose weight does not require grad")
    p.add_argument("--csv", metavar="PATH", help="write one row per layer ('-' for stdout)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' for stdout)")
    p.add_argument("--plots", metavar="DIR", help="write an ESD plot per layer and an alpha summary chart")
    p.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    p.add_argument("--device", default="cpu", help="device the spectra are computed on, e.g. cuda (default cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, analyse it, print / write the results. Returns 0."""
    if args.csv == "-" and args.json == "-":
        raise ConfigError("--csv - and --json - both write to stdout; send one of them to a file")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {exc}") from exc
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
    model = load_model(args.source, args.arch, args.num_classes, args.in_channels, args.seed).to(device)
    refs = find_layers(model, split_qkv=args.split_qkv, include_frozen=not args.exclude_frozen)
    if not refs:
        raise ConfigError(f"{args.source!r} has no analysable layers (Linear, Conv, Embedding, ...)")
    bar = None
    if not args.no_progress and len(refs) >= PROGRESS_MIN_LAYERS:
        bar = _progress_bar(len(refs))
    try:
        report = AnalysisReport(analyze_layers(refs, options, bar), options)
    finally:
        if bar is not None:
            bar.close()

    to_stdout = "-" in (args.csv, args.json)
    if args.csv:
        if args.csv == "-":
            report.to_csv(sys.stdout)
        else:
            report.to_csv(args.csv)
    if args.json:
        text = json.dumps(_json_safe(report_payload(report, args.source)), indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as handle:
                handle.write(text + "\n")
    if args.plots:
        write_plots(report, args.plots)
    if not to_stdout:
        print(format_table(report))
    return 0


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="analyzing", unit="layer", file=sys.stderr, leave=False)


# ----------------------------------------------------------------------------- loading


def load_model(source: str, arch: str | None, num_classes: int | None, in_channels: int = 3, seed: int = 0) -> nn.Module:
    """The model named by ``source`` (a checkpoint path or an architecture name).

    Raises:
        FileNotFoundError: ``source`` looks like a path and does not exist.
        ConfigError: an unknown architecture, a checkpoint without a model, a state dict without
            ``arch`` or one that does not fit it.
    """
    if os.path.exists(source):
        if os.path.isdir(source):
            raise ConfigError(f"{source!r} is a directory; give a checkpoint file (e.g. {source}/checkpoint.pt)")
        return _model_from_checkpoint(source, arch, num_classes, in_channels)
    if os.sep in source or source.endswith(CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"no such checkpoint file: {source!r}")
    if arch is not None:
        raise ConfigError(f"--arch is for state-dict checkpoints, but {source!r} is not a file")
    torch.manual_seed(seed)
    return build_arch(source, num_classes, in_channels)


def _load_file(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:  # noqa: BLE001 - retried below as a full unpickling
        if not _needs_full_unpickling(safe_error):
            raise ConfigError(f"cannot read checkpoint {path!r}: {safe_error}") from safe_error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as exc:
        raise ConfigError(
            f"cannot read checkpoint {path!r}: {exc} (the pickled model's class is not importable here; "
            "save model.state_dict() instead and pass --arch)"
        ) from exc
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot read checkpoint {path!r}: {type(exc).__name__}: {exc}") from exc
    log.debug("%s holds pickled objects (a whole model?): loaded it in full; only load files you trust", path)
    return loaded


def _needs_full_unpickling(error: Exception) -> bool:
    """True when ``weights_only=True`` refused the file because it pickles other objects."""
    text = str(error)
    return "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text


def _model_from_checkpoint(path: str, arch: str | None, num_classes: int | None, in_channels: int) -> nn.Module:
    obj = _load_file(path)
    if isinstance(obj, nn.Module):
        return obj
    found = _find_model_or_state_dict(obj)
    if isinstance(found, nn.Module):
        return found
    if found is None:
        raise ConfigError(
            f"checkpoint {path!r} holds neither a model nor a state dict (looked at top-level keys and "
            f"{', '.join(STATE_DICT_KEYS)})"
        )
    state = strip_prefixes(found)
    if arch is None:
        if isinstance(obj, dict) and isinstance(obj.get("arch") or obj.get("model_name"), str):
            arch = obj.get("arch") or obj.get("model_name")
        else:
            raise ConfigError(f"checkpoint {path!r} is a state dict: name its architecture with --arch NAME")
    if num_classes is None:
        num_classes = infer_num_classes(state)
    model = build_arch(arch, num_classes, in_channels)
    check_state_dict(model, state, arch)
    model.load_state_dict(state)
    return model


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _find_model_or_state_dict(obj: Any) -> nn.Module | dict | None:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or _is_state_dict(inner):
                return inner
    return None


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes from every key."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


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
        raise ConfigError(f"the state dict does not fit --arch {arch!r}: {'; '.join(parts)}")


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
    pool = (project_names if library in ("", "project") else ()) + tv_names + timm_names
    close = difflib.get_close_matches(bare, pool, n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    searched = {"": "project, torchvision or timm", "project": "project", "torchvision": "torchvision", "timm": "timm"}
    raise ConfigError(f"unknown architecture {name!r} (not a file, and not a {searched[library]} model){hint}")


# ----------------------------------------------------------------------------- output


def report_payload(report: AnalysisReport, source: str) -> dict[str, Any]:
    """The JSON document: source, options and one record per layer."""
    options = {k: v for k, v in vars(report.options).items() if k != "keep_eigenvalues"}
    return {"source": source, "options": options, "layers": report.to_records()}


def _json_safe(value: Any) -> Any:
    """NaN / inf become ``null`` (JSON has no NaN); tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


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
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    right = {3, 4, 5, 6, 7, 8}

    def line(cells: tuple[str, ...]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    fitted = [r.alpha for r in report if r.ok]
    mean = sum(fitted) / len(fitted) if fitted else float("nan")
    summary = f"{len(report)} layers, {len(fitted)} fitted (fit={report.options.fit}), mean alpha {_num(mean, '.3f')}"
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in rows), summary])


def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "layer"


def write_plots(report: AnalysisReport, directory: str) -> None:
    """``DIR/esd_<index>_<layer>.png`` per layer and ``DIR/alpha_summary.png``."""
    from .. import plots

    os.makedirs(directory, exist_ok=True)
    for index, record in enumerate(report):
        if record.eigenvalues is not None:
            plots.plot_esd(record, os.path.join(directory, f"esd_{index:03d}_{_safe_filename(record.name)}.png"))
    plots.plot_alpha_summary(list(report), os.path.join(directory, "alpha_summary.png"))
