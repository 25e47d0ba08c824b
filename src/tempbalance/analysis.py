"""``analyze(model)``: the spectral metrics of every layer, as a report of per-layer records.

Ties the pieces together: layers -> matrices -> pooled eigenvalues -> power-law fit + norms.
"""

from __future__ import annotations

import csv
import inspect
import io
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import IO, Any, Iterable, Iterator, Mapping, Sequence, overload

import numpy as np
import torch
from torch import nn

from .atomic import write_atomic
from .farms import check_window_options, farms_windows
from .layers import LayerRef, MatrixOptions, find_layers
from .powerlaw import FIT_METHODS, HILL_CONVENTIONS, PowerLawFit, fit_power_law
from .progress import Progress
from .spectrum import PRECISIONS, compute_dtype, iter_pooled_spectra

__all__ = ["AnalysisOptions", "LayerRecord", "AnalysisReport", "analyze", "analyze_layers", "spectral_metrics"]

logger = logging.getLogger(__name__)

LONG_ANALYSIS_S = 3.0  # off a terminal, an analysis logs its progress once it has run this long
_BATCH_ELEMENTS = 1 << 26  # weights gathered per batched eigen pass (256 MiB in float32)


@dataclass(frozen=True)
class AnalysisOptions:
    """Every knob of the measurement, validated on construction.

    Attributes:
        fit: ``"median"`` (default), ``"ks"`` or ``"fix-finger"``.
        xmin_pos: median fit: the tail starts at ``floor(N / xmin_pos)``. Default 2.
        hill: ``"reference"`` (default) or ``"textbook"`` Hill numerator.
        filter_zeros: fit only eigenvalues ``> zero_threshold``. Default False.
        zero_threshold: default 1e-5.
        precision: ``"auto"`` (weight dtype, half upcast to float32), ``"float32"``, ``"float64"``.
        conv_mode: ``"per_position"`` (default) or ``"flatten"``.
        conv_norm: eigenvalue scale of per-position conv matrices. Default 0.5.
        keep_eigenvalues: store each layer's eigenvalues (numpy) in its record.
        esd: ``"full"`` (default): the spectrum of the whole matrices; ``"farms"``: pooled over
            fixed-aspect-ratio windows (FARMS, see :mod:`tempbalance.farms`); a record's
            ``matrix_shape`` / ``num_matrices`` are then those of the windows.
        window_rows, window_q, windows_per_dim: FARMS windows of ``window_rows x
            int(window_rows * window_q)`` at ``windows_per_dim`` offsets per side (default 100,
            2.0, 10); convs are cut into ``int(cols // window_q) x cols`` blocks per kernel position.
    """

    fit: str = "median"
    xmin_pos: float = 2
    hill: str = "reference"
    filter_zeros: bool = False
    zero_threshold: float = 1e-5
    precision: str = "auto"
    conv_mode: str = "per_position"
    conv_norm: float = 0.5
    keep_eigenvalues: bool = False
    esd: str = "full"
    window_rows: int = 100
    window_q: float = 2.0
    windows_per_dim: int = 10

    def __post_init__(self) -> None:
        if self.fit not in FIT_METHODS:
            raise ValueError(f"fit={self.fit!r} is not one of {tuple(FIT_METHODS)}")
        if self.hill not in HILL_CONVENTIONS:
            raise ValueError(f"hill={self.hill!r} is not one of {HILL_CONVENTIONS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {PRECISIONS}")
        if not (isinstance(self.xmin_pos, (int, float)) and math.isfinite(self.xmin_pos) and self.xmin_pos >= 1):
            raise ValueError(f"xmin_pos={self.xmin_pos!r} must be a finite number >= 1")
        if not (isinstance(self.zero_threshold, (int, float)) and self.zero_threshold >= 0):
            raise ValueError(f"zero_threshold={self.zero_threshold!r} must be a number >= 0")
        MatrixOptions(self.conv_mode, self.conv_norm)  # validates both
        check_window_options(self.esd, self.window_rows, self.window_q, self.windows_per_dim)

    @property
    def matrix_options(self) -> MatrixOptions:
        return MatrixOptions(self.conv_mode, self.conv_norm)


@dataclass
class LayerRecord:
    """The spectral metrics of one layer. Eigenvalues are ``lambda = sigma^2``.

    Attributes:
        name: module name in ``model.named_modules()``.
        kind: module class name.
        shape: the weight's shape.
        matrix_shape: ``(m, n)`` of each analysed matrix; ``num_matrices`` of them pooled.
        num_eigs: eigenvalues in the spectrum.
        alpha, xmin, ks_distance, tail_size: the power-law fit (NaN / 0 on failure).
        lambda_max: largest eigenvalue (squared spectral norm).
        log_spectral_norm: ``log10(lambda_max)``.
        norm: ``sum(lambda)`` (squared Frobenius norm); ``log_norm = log10(norm)``.
        alpha_weighted: ``alpha * log10(lambda_max)``.
        stable_rank: ``sum(lambda) / lambda_max``.
        entropy: ``-sum p ln p / ln(rank)``, ``p = lambda / sum(lambda)``.
        frozen: the weight does not require grad.
        tied_names: other modules sharing this weight.
        reason: why the fit failed (None when it worked).
        eigenvalues: the ascending spectrum when ``keep_eigenvalues`` (else None).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    matrix_shape: tuple[int, int]
    num_matrices: int
    num_eigs: int
    alpha: float
    xmin: float
    ks_distance: float
    tail_size: int
    lambda_max: float
    log_spectral_norm: float
    norm: float
    log_norm: float
    alpha_weighted: float
    stable_rank: float
    entropy: float
    frozen: bool = False
    tied_names: list[str] = field(default_factory=list)
    reason: str | None = None
    eigenvalues: np.ndarray | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """True when the power-law fit worked."""
        return self.reason is None

    def to_dict(self, with_eigenvalues: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["matrix_shape"] = list(self.matrix_shape)
        eigs = d.pop("eigenvalues")
        if with_eigenvalues and eigs is not None:
            d["eigenvalues"] = eigs.tolist()
        return d


SCALAR_COLUMNS = tuple(f.name for f in fields(LayerRecord) if f.name not in ("eigenvalues",))


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else float("nan")


def spectral_metrics(eigs: torch.Tensor, max_side: int, eps: float = torch.finfo(torch.float32).eps) -> dict[str, float]:
    """Norm-based metrics of an ascending spectrum (any length >= 1).

    Args:
        eigs: 1-D ascending float64 eigenvalues.
        max_side: the larger matrix side, for the numerical-rank tolerance of the entropy.
        eps: machine epsilon of the dtype the eigenvalues were computed in; the entropy's rank
            counts ``lambda > lambda_max * (max_side * eps)^2`` (numpy's ``matrix_rank`` rule
            on singular values, as WeightWatcher).
    """
    lam_max = float(eigs[-1])
    total = float(eigs.sum())
    tol = lam_max * (max_side * eps) ** 2
    positive = eigs[eigs > tol]
    rank = positive.numel()
    if total > 0 and rank > 1:
        p = positive / total
        entropy = float(-(p * torch.log(p)).sum()) / math.log(rank)
    elif total > 0:
        entropy = 0.0
    else:
        entropy = float("nan")
    return {
        "lambda_max": lam_max,
        "log_spectral_norm": _log10(lam_max),
        "norm": total,
        "log_norm": _log10(total),
        "stable_rank": total / lam_max if lam_max > 0 else float("nan"),
        "entropy": entropy,
    }


def _noise_floor(lambda_max: float, max_side: int, weight_dtype: torch.dtype, precision: str) -> float:
    """Eigenvalues up to this size are round-off of the Gram eigensolver, not signal:
    ``lambda_max * eps * max(16, sqrt(max_side))`` in the compute dtype (measured noise of
    rank-deficient matrices: 1-3 eps * lambda_max for sides 64-1024)."""
    eps = torch.finfo(compute_dtype(weight_dtype, precision)).eps
    return lambda_max * eps * max(16.0, math.sqrt(max_side))


def _nan_metrics() -> dict[str, float]:
    nan = float("nan")
    return dict.fromkeys(("lambda_max", "log_spectral_norm", "norm", "log_norm", "stable_rank", "entropy"), nan)


def _make_record(ref: LayerRef, stack: torch.Tensor, eigs: torch.Tensor | None, options: AnalysisOptions) -> LayerRecord:
    m, n = stack.shape[1], stack.shape[2]
    if eigs is None:
        fit = PowerLawFit.failed(
            "non-finite weights (NaN or inf, or sum of squares overflowing the compute dtype: try precision='float64')", 0
        )
        metrics = _nan_metrics()
        num_eigs = stack.shape[0] * min(m, n)
    else:
        fit = fit_power_law(
            eigs,
            options.fit,
            xmin_pos=options.xmin_pos,
            hill=options.hill,
            filter_zeros=options.filter_zeros,
            zero_threshold=options.zero_threshold,
        )
        metrics = spectral_metrics(eigs, max(m, n), torch.finfo(stack.dtype).eps)
        num_eigs = eigs.numel()
        if fit.ok and fit.xmin <= _noise_floor(metrics["lambda_max"], max(m, n), stack.dtype, options.precision):
            hint = "raise zero_threshold" if options.filter_zeros else "set filter_zeros=True"
            fit = PowerLawFit.failed(
                f"xmin is at the eigensolver's round-off level (rank-deficient matrix); {hint} "
                "to fit the non-zero eigenvalues",
                fit.num_eigs,
            )
    return LayerRecord(
        name=ref.name,
        kind=ref.kind,
        shape=tuple(ref.weight.shape),
        matrix_shape=(m, n),
        num_matrices=stack.shape[0],
        num_eigs=num_eigs,
        alpha=fit.alpha,
        xmin=fit.xmin,
        ks_distance=fit.ks_distance,
        tail_size=fit.tail_size,
        alpha_weighted=fit.alpha * metrics["log_spectral_norm"],
        frozen=ref.frozen,
        tied_names=list(ref.tied_names),
        reason=fit.reason,
        eigenvalues=eigs.cpu().numpy() if (options.keep_eigenvalues and eigs is not None) else None,
        **metrics,
    )


def _batches(refs: Sequence[LayerRef]) -> Iterator[list[LayerRef]]:
    batch: list[LayerRef] = []
    size = 0
    for ref in refs:
        batch.append(ref)
        size += ref.weight.numel()
        if size >= _BATCH_ELEMENTS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@torch.no_grad()
def analyze_layers(
    refs: Sequence[LayerRef], options: AnalysisOptions | None = None, progress: Any = None
) -> list[LayerRecord]:
    """Measure the given layers (see :func:`find_layers`), in order.

    Weights are read without modification or autograd; each batch of layers is solved with
    one ``eigvalsh`` call per matrix shape, on the weights' own device.

    Args:
        refs: the layers.
        options: the measurement settings (default :class:`AnalysisOptions`).
        progress: optional :class:`~tempbalance.progress.Progress` (or any object with
            ``update(n)``, e.g. a tqdm bar), advanced per layer.
    """
    options = options or AnalysisOptions()
    records: list[LayerRecord | None] = [None] * len(refs)
    mopts = options.matrix_options
    offset = 0
    for batch in _batches(refs):
        stacks = [ref.matrices(mopts, compute_dtype(ref.weight.dtype, options.precision)) for ref in batch]
        if options.esd == "farms":
            stacks = [farms_windows(ref, stack, options) for ref, stack in zip(batch, stacks)]
        for positions, spectra in iter_pooled_spectra(stacks, options.precision):
            for i, eigs in zip(positions, spectra):
                _store(records, offset + i, _make_record(batch[i], stacks[i], eigs, options), progress)
        offset += len(batch)
        del stacks
    return records  # type: ignore[return-value]


def _store(records: list[LayerRecord | None], index: int, record: LayerRecord, progress: Any) -> None:
    if record.reason:
        logger.debug("layer %s: no fit (%s)", record.name, record.reason)
    records[index] = record
    if progress is not None:
        progress.update(1)


class AnalysisReport(Sequence[LayerRecord]):
    """An ordered sequence of :class:`LayerRecord`, indexable by position or layer name (a tied
    weight's record under each of its names)."""

    def __init__(self, records: Iterable[LayerRecord], options: AnalysisOptions):
        self._records = list(records)
        self._by_name = {r.name: r for r in self._records}
        for record in self._records:
            for tied in record.tied_names:
                self._by_name.setdefault(tied, record)
        self.options = options

    @overload
    def __getitem__(self, key: int) -> LayerRecord: ...
    @overload
    def __getitem__(self, key: str) -> LayerRecord: ...
    @overload
    def __getitem__(self, key: slice) -> list[LayerRecord]: ...

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            if key not in self._by_name:
                raise KeyError(f"no analysed layer named {key!r}; layers: {list(self._by_name)}")
            return self._by_name[key]
        return self._records[key]

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"AnalysisReport({len(self)} layers, fit={self.options.fit!r})"

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._records]

    def alphas(self) -> dict[str, float]:
        """``{layer name: alpha}`` (NaN for failed fits)."""
        return {r.name: r.alpha for r in self._records}

    def group_by(self, by: str) -> list:
        """Alpha per Transformer block (``"block"``) or per module type (``"module"``), from the
        layer names (see :func:`tempbalance.summaries.summarize`); a list of ``GroupSummary``."""
        from .summaries import summarize

        return summarize(self._records, by)

    def to_dict(self, with_eigenvalues: bool = False) -> dict[str, dict[str, Any]]:
        """``{layer name: record as a dict}``, in layer order."""
        return {r.name: r.to_dict(with_eigenvalues) for r in self._records}

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per layer, in order (no eigenvalues)."""
        return [r.to_dict() for r in self._records]

    def to_csv(self, path: str | os.PathLike | IO[str]) -> None:
        """Write one row per layer with the scalar columns to a file path or an open text file.

        Shapes are written as ``"64x3x3x3"``, tied names joined by ``";"``; NaN as ``nan``.
        """
        if hasattr(path, "write"):
            self._write_csv(path)  # type: ignore[arg-type]
            return
        buffer = io.StringIO(newline="")
        self._write_csv(buffer)
        write_atomic(path, buffer.getvalue())  # never a half-written file

    def _write_csv(self, handle: IO[str]) -> None:
        writer = csv.DictWriter(handle, fieldnames=list(SCALAR_COLUMNS))
        writer.writeheader()
        for row in self.to_records():
            row["shape"] = "x".join(map(str, row["shape"]))
            row["matrix_shape"] = "x".join(map(str, row["matrix_shape"]))
            row["tied_names"] = ";".join(row["tied_names"])
            row["reason"] = row["reason"] or ""
            writer.writerow(row)

    def to_pandas(self):  # -> pandas.DataFrame
        """A DataFrame with one row per layer (requires pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("to_pandas() needs pandas: pip install pandas") from exc
        return pd.DataFrame(self.to_records(), columns=list(SCALAR_COLUMNS))


def analyze(
    model: nn.Module | str | os.PathLike | Mapping[str, torch.Tensor],
    fit: str = "median",
    *,
    types: Iterable[type] | None = None,
    split_qkv: bool = False,
    include_frozen: bool = True,
    progress: bool = False,
    device: str | torch.device | None = None,
    batch_bytes: int | None = None,
    journal: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    **options: Any,
) -> AnalysisReport:
    """Spectral (HT-SR) analysis of every layer of a model or of a checkpoint file.

    Args:
        model: an ``nn.Module`` (DDP / torch.compile wrappers are unwrapped), or a checkpoint
            without its model: a path (``.safetensors`` file, ``.pt``/``.pth``/``.bin`` state
            dict, a Hugging Face model directory of shards, a ``tempbalance train`` run
            directory), ``"hf:ORG/NAME[@REVISION]"``, or a state dict. A checkpoint's tensors are
            read one at a time and analysed by shape (2-D: a matrix, 3-D/4-D/5-D: a conv weight),
            named as the module's layers would be (the key without ``.weight``).
        fit: ``"median"`` (the TempBalance reference, default), ``"ks"`` (Clauset / the
            WeightWatcher fit) or ``"fix-finger"``.
        types: module types to analyse (default: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d,
            Embedding, GPT-2 Conv1D, MultiheadAttention's fused projection, and any type
            added with :func:`tempbalance.register_layer_type`). Modules only.
        split_qkv: analyse fused q/k/v projections (MultiheadAttention's ``in_proj``, Linear /
            GPT-2 Conv1D ``c_attn``, ``qkv``, ``query_key_value``, ...) as three layers.
        include_frozen: include layers whose weight does not require grad (marked ``frozen``).
        progress: show the progress on stderr: a tqdm bar on a terminal (if tqdm is installed),
            else a log line per 10% of the layers (see :mod:`tempbalance.progress`).
        device: checkpoints only: where the spectra are computed (default cpu).
        batch_bytes: checkpoints only: upcast weights per batched eigen pass (default 64 MiB).
        journal: checkpoints only: a JSONL file receiving each finished tensor's records; an
            interrupted analysis run again with the same journal skips what it holds.
        allow_pickle: checkpoints only: unpickle torch files that hold more than tensors (a
            whole pickled model). This runs code from the file: only for files you trust.
        **options: any field of :class:`AnalysisOptions` (``xmin_pos``, ``hill``,
            ``filter_zeros``, ``zero_threshold``, ``precision``, ``conv_mode``, ``conv_norm``,
            ``keep_eigenvalues``, ``esd``, ``window_rows``, ``window_q``, ``windows_per_dim``).

    Returns:
        An :class:`AnalysisReport`.
    """
    accepted = _accepted_options()
    unknown = set(options) - set(accepted)
    if unknown:
        raise TypeError(f"analyze() got unknown option(s) {sorted(unknown)}; accepted: {accepted}")
    opts = AnalysisOptions(fit=fit, **options)
    if not isinstance(model, nn.Module):
        return _analyze_source(model, opts, types=types, split_qkv=split_qkv, progress=progress, device=device,
                               batch_bytes=batch_bytes, journal=journal, allow_pickle=allow_pickle)
    for name, value in (("device", device), ("batch_bytes", batch_bytes), ("journal", journal)):
        if value is not None:
            raise TypeError(f"analyze(): {name}= is for checkpoint sources; a module is analysed where its weights are")
    refs = find_layers(model, types, split_qkv=split_qkv, include_frozen=include_frozen)
    if split_qkv:
        from .transformer_layers import split_fused_qkv

        refs = split_fused_qkv(refs)
    return _run_with_progress(refs, opts, progress)


def _accepted_options() -> list[str]:
    """Every keyword ``analyze()`` takes: its own parameters and the :class:`AnalysisOptions` fields."""
    own = [p.name for p in inspect.signature(analyze).parameters.values()
           if p.kind is inspect.Parameter.KEYWORD_ONLY or p.name == "fit"]
    return sorted(set(own) | {f.name for f in fields(AnalysisOptions)})


def _run_with_progress(refs: Sequence[LayerRef], opts: AnalysisOptions, progress: bool) -> AnalysisReport:
    with layer_progress(len(refs), progress) as bar:
        return AnalysisReport(analyze_layers(refs, opts, bar), opts)


def _analyze_source(source: Any, opts: AnalysisOptions, *, types: Any, split_qkv: bool, progress: bool, device: Any,
                    batch_bytes: int | None, journal: Any, allow_pickle: bool) -> AnalysisReport:
    """``analyze()`` of a checkpoint: a path, ``hf:`` name or state dict (lazy imports: the
    streaming path needs the scheduler's planner and the q/k/v splitter)."""
    if not isinstance(source, (str, os.PathLike, Mapping)):
        raise TypeError(
            f"analyze() expects an nn.Module, a checkpoint path, 'hf:ORG/NAME' or a state dict, got {type(source).__name__}"
        )
    from .checkpoint_analysis import DEFAULT_BATCH_BYTES, analyze_checkpoint, plan_tensors
    from .checkpoint_files import open_checkpoint

    opened = open_checkpoint(source, allow_pickle=allow_pickle)
    if isinstance(opened, nn.Module):  # a whole pickled model (allow_pickle)
        return analyze(opened, opts.fit, types=types, split_qkv=split_qkv, progress=progress,
                       **{k: v for k, v in asdict(opts).items() if k != "fit"})
    if types is not None:
        raise TypeError("analyze(): types= selects module classes; a checkpoint file has none (its tensors are analysed by shape)")
    total = sum(len(p.refs) for p in plan_tensors(opened, split_qkv=split_qkv, options=opts)) if progress else 0
    with layer_progress(total, progress) as bar:
        return analyze_checkpoint(opened, opts, split_qkv=split_qkv, device=device,
                                  batch_bytes=DEFAULT_BATCH_BYTES if batch_bytes is None else batch_bytes,
                                  journal=journal, progress=bar)


def layer_progress(total: int, enabled: bool = True) -> Progress:
    """The progress of an analysis of ``total`` layers: a bar on a terminal, else a log line per
    10% of the layers once it has run :data:`LONG_ANALYSIS_S` seconds (a short one logs nothing)."""
    return Progress(total, "analyzing layers", "layer", enabled=enabled, log_every=0.1, delay=LONG_ANALYSIS_S,
                    leave=False)
