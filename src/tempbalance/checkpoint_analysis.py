"""Spectral analysis of a checkpoint file without its model: tensors streamed one at a time,
batched by shape under a memory budget, journaled for resuming, split across ranks by cost.

Peak memory is the batch budget plus a few times the largest tensor, whatever the checkpoint's
size: each tensor is read alone (see :mod:`tempbalance.checkpoint_files`), upcast, moved to the
device, measured with its batch and released.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .analysis import AnalysisOptions, AnalysisReport, LayerRecord, analyze_layers
from .checkpoint_files import CheckpointFileError, CheckpointSource, TensorInfo, dtype_policy, readable_dtypes
from .distributed import assign_layers, layer_cost
from .errors import ConfigError
from .layers import LayerRef, tensor_layer_name, tensor_layer_ref
from .transformer_layers import fused_qkv_parts

__all__ = ["DEFAULT_BATCH_BYTES", "AnalysisJournal", "PlannedTensor", "analyze_checkpoint", "plan_tensors"]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 64 << 20  # upcast weights gathered per batched eigen pass
JOURNAL_FORMAT = "tempbalance-analyze-journal"


@dataclass
class PlannedTensor:
    """One stored tensor to analyse: its layers (one, or three q/k/v parts) on meta weights.

    Attributes:
        info: where it is stored, its shape and dtype.
        refs: the :class:`LayerRef` s measured from it (meta weights until it is read).
        cost: eigen cost of its layers (:func:`tempbalance.distributed.layer_cost`).
    """

    info: TensorInfo
    refs: list[LayerRef]
    cost: float

    @property
    def key(self) -> str:
        return self.info.key


def plan_tensors(source: CheckpointSource, *, split_qkv: bool = False, options: AnalysisOptions | None = None) -> list[PlannedTensor]:
    """The analysable tensors of ``source`` in report order, from headers alone.

    A tensor is analysed when its key names a weight (``*.weight``, ``nn.MultiheadAttention``'s
    ``*_proj_weight``), it has 2 to 5 dimensions and a floating dtype; integer and bool tensors are
    skipped. ``split_qkv`` splits fused q/k/v projections as ``tempbalance.transformer_layers``
    does for modules.

    Raises:
        CheckpointFileError: an analysable tensor stored in a dtype torch cannot read.
    """
    mopts = (options or AnalysisOptions()).matrix_options
    plan = []
    for info in source.tensors():
        if tensor_layer_name(info.key) is None or not 2 <= len(info.shape) <= 5:
            continue
        policy = dtype_policy(info.dtype)
        if policy == "skip":
            continue
        if policy == "unsupported":
            raise CheckpointFileError(
                f"{info.shard.label}: tensor {info.key!r} is stored as {info.stored_dtype}, which this torch cannot "
                f"read as a weight; accepted: {readable_dtypes()}"
            )
        ref = tensor_layer_ref(info.key, info.meta())
        if ref is None:
            continue
        ref.tied_names = [name for key in source.ties.get(info.key, []) if (name := tensor_layer_name(key))]
        refs = (fused_qkv_parts(ref) if split_qkv else None) or [ref]
        plan.append(PlannedTensor(info, refs, sum(layer_cost(r, mopts) for r in refs)))
    return plan


# ----------------------------------------------------------------------------- journal


def _encode(value: Any) -> Any:
    """JSON-safe: non-finite floats as strings ("nan", "inf", "-inf"), numpy arrays as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


_FLOAT_FIELDS = {f.name for f in fields(LayerRecord) if f.type in ("float", float)}


def _record_from_dict(data: dict[str, Any]) -> LayerRecord:
    known = {f.name for f in fields(LayerRecord)}
    values = {k: v for k, v in data.items() if k in known}
    for name in _FLOAT_FIELDS & set(values):
        values[name] = float(values[name])
    values["shape"] = tuple(values["shape"])
    values["matrix_shape"] = tuple(values["matrix_shape"])
    eigs = data.get("eigenvalues")
    values["eigenvalues"] = None if eigs is None else np.asarray(eigs, dtype=np.float64)
    return LayerRecord(**values)


class AnalysisJournal:
    """Finished tensors of a checkpoint analysis, appended as one JSON line each.

    The first line is a header naming the checkpoint (file names and sizes) and the settings;
    a journal written with other ones is refused, so resumed results never mix settings. A
    torn last line (the process was killed while writing it) is dropped. Under torchrun each
    rank appends to ``PATH.rank<r>``; :meth:`load` reads them all.

    Args:
        path: the journal file (created when missing).
        header: what must match for its results to be reused.
        rank, world_size: this process's place (one file per rank when ``world_size > 1``).
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any], rank: int = 0, world_size: int = 1):
        self.path = Path(path)
        self.header = {"journal": JOURNAL_FORMAT, "version": 1, **_encode(header)}
        self.own = self.path if world_size == 1 else self.path.with_name(f"{self.path.name}.rank{rank}")
        self._handle = None

    def files(self) -> list[Path]:
        """Every journal file of this path (the single-process one and each rank's)."""
        ranks = sorted(self.path.parent.glob(f"{self.path.name}.rank*")) if self.path.parent.is_dir() else []
        return [p for p in [self.path, *ranks] if p.is_file()]

    def load(self) -> dict[str, list[LayerRecord]]:
        """``{tensor key: records}`` already finished, from every journal file of this path.

        Raises:
            ConfigError: a journal written for another checkpoint or other settings.
        """
        done: dict[str, list[LayerRecord]] = {}
        for path in self.files():
            done.update(self._read(path))
        return done

    def _read(self, path: Path) -> dict[str, list[LayerRecord]]:
        done = {}
        good_end = 0
        with open(path, "rb") as handle:
            lines = handle.read().split(b"\n")
        for number, raw in enumerate(lines):
            if not raw.strip():
                good_end += len(raw) + 1
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                if number < len(lines) - 1 or number == 0:
                    raise ConfigError(f"{path}: line {number + 1} is not JSON; delete the file to start over") from None
                break  # a torn last line
            if number == 0:
                self._check_header(path, entry)
            else:
                done[entry["key"]] = [_record_from_dict(r) for r in entry["records"]]
            good_end += len(raw) + 1
        if path == self.own and good_end < path.stat().st_size:  # drop a torn line before appending
            with open(path, "r+b") as handle:
                handle.truncate(good_end)
        return done

    def _check_header(self, path: Path, header: Any) -> None:
        if not isinstance(header, dict) or header.get("journal") != JOURNAL_FORMAT:
            raise ConfigError(f"{path}: not an analysis journal; delete it or choose another output")
        expected = json.loads(json.dumps(self.header))
        differ = sorted(k for k in set(expected) | set(header) if expected.get(k) != header.get(k))
        if differ:
            details = "; ".join(f"{k}: journal {header.get(k)!r}, now {expected.get(k)!r}" for k in differ)
            raise ConfigError(
                f"{path}: partial results of another analysis ({details}); delete it to start over, "
                "or resume with the settings it was written with"
            )

    def append(self, key: str, records: Sequence[LayerRecord]) -> None:
        """Add one finished tensor's records (flushed at once)."""
        if self._handle is None:
            self.own.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.own.is_file() or self.own.stat().st_size == 0
            self._handle = open(self.own, "a")
            if fresh:
                self._handle.write(json.dumps(self.header, allow_nan=False) + "\n")
        line = {"key": key, "records": [_encode(r.to_dict(with_eigenvalues=True)) for r in records]}
        self._handle.write(json.dumps(line, allow_nan=False) + "\n")
        self._handle.flush()

    def sync(self) -> None:
        """Force the appended lines to disk (called after each batch)."""
        if self._handle is not None:
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove(self) -> None:
        """Delete every journal file of this path (after the final report is written)."""
        self.close()
        for path in self.files():
            path.unlink()


# ----------------------------------------------------------------------------- streaming


def _upcast(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On ``device``, in float32 (float64 kept): moved first, so half the bytes travel."""
    tensor = tensor.to(device)
    target = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return tensor if tensor.dtype == target else tensor.to(target)


def _with_weight(planned: PlannedTensor, weight: torch.Tensor) -> list[LayerRef]:
    if tuple(weight.shape) != planned.info.shape:
        raise CheckpointFileError(
            f"{planned.info.shard.label}: tensor {planned.key!r} has shape {tuple(weight.shape)}, its header says "
            f"{planned.info.shape}"
        )
    return [dataclasses.replace(ref, weight=weight, tied_names=list(ref.tied_names)) for ref in planned.refs]


def _stream(
    planned: Sequence[PlannedTensor],
    options: AnalysisOptions,
    device: torch.device,
    batch_bytes: int,
    progress: Any,
) -> Iterator[tuple[list[PlannedTensor], list[list[LayerRecord]]]]:
    """Yield ``(tensors, their records)`` batch by batch: shard by shard, tensors of one shape
    together, at most ``batch_bytes`` of upcast weights per batch (a larger tensor goes alone).
    Before a tensor is read, the next one is prefetched (:meth:`Shard.prefetch`), so the disk
    works while the eigensolver does."""
    by_shard: dict[int, list[PlannedTensor]] = {}
    for p in planned:
        by_shard.setdefault(id(p.info.shard), []).append(p)
    order = [p for members in by_shard.values() for p in sorted(members, key=lambda p: (p.info.shape, p.key))]
    batch: list[PlannedTensor] = []
    refs: list[LayerRef] = []
    size = 0
    for index, p in enumerate(order):
        if batch and p.info.shard is not batch[-1].info.shard:
            yield batch, _measure(batch, refs, options, progress)
            batch, refs, size = [], [], 0
        if index + 1 < len(order):
            order[index + 1].info.shard.prefetch(order[index + 1].key)
        weight = _upcast(p.info.shard.read(p.key), device)
        batch.append(p)
        refs.extend(_with_weight(p, weight))
        size += weight.numel() * weight.element_size()
        del weight
        if size >= batch_bytes:
            yield batch, _measure(batch, refs, options, progress)
            batch, refs, size = [], [], 0
    if batch:
        yield batch, _measure(batch, refs, options, progress)


def _measure(batch: list[PlannedTensor], refs: list[LayerRef], options: AnalysisOptions, progress: Any) -> list[list[LayerRecord]]:
    records = analyze_layers(refs, options, progress)
    refs.clear()  # release the weights before the next batch is read
    out, start = [], 0
    for p in batch:
        out.append(records[start : start + len(p.refs)])
        start += len(p.refs)
    return out


def _rank_and_world(group: Any) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def journal_header(source: CheckpointSource, options: AnalysisOptions, split_qkv: bool) -> dict[str, Any]:
    """What a journal must match to be resumed: the checkpoint's files and every setting."""
    return {"source": source.fingerprint(), "options": dataclasses.asdict(options), "split_qkv": bool(split_qkv)}


@torch.no_grad()
def analyze_checkpoint(
    source: CheckpointSource,
    options: AnalysisOptions | None = None,
    *,
    split_qkv: bool = False,
    device: str | torch.device | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    journal: str | os.PathLike | None = None,
    progress: Any = None,
    group: Any = None,
) -> AnalysisReport:
    """Measure every analysable tensor of a checkpoint (see :func:`plan_tensors`).

    Args:
        source: from :func:`tempbalance.checkpoint_files.open_checkpoint`.
        options: the measurement settings (default :class:`AnalysisOptions`).
        split_qkv: analyse fused q/k/v projections as three layers.
        device: where the spectra are computed (default cpu); one batch at a time goes there.
        batch_bytes: upcast weights gathered per batched eigen pass (default 64 MiB).
        journal: a JSONL file that receives each finished tensor's records as they are computed;
            tensors it already holds (from an interrupted run with the same checkpoint and
            settings) are not measured again. Left in place.
        progress: a :class:`~tempbalance.progress.Progress` (or any object with ``update(n)``,
            e.g. a tqdm bar), advanced per layer; the journal's layers go to its ``skip``.
        group: process group to split the tensors over by cost (default: the world, when a
            process group is initialised); every rank returns the full report.

    Returns:
        An :class:`AnalysisReport`: one record per layer, named as ``analyze(module)`` names
        them, in the source's report order.
    """
    options = options or AnalysisOptions()
    if isinstance(batch_bytes, bool) or not isinstance(batch_bytes, int) or batch_bytes < 1:
        raise ConfigError(f"batch_bytes={batch_bytes!r} must be a positive number of bytes")
    device = torch.device(device or "cpu")
    plan = plan_tensors(source, split_qkv=split_qkv, options=options)
    if not plan:
        raise CheckpointFileError(
            f"{source.description}: no analysable weights (tensors named *.weight of 2 to 5 dimensions, floating point)"
        )
    rank, world = _rank_and_world(group)
    book = AnalysisJournal(journal, journal_header(source, options, split_qkv), rank, world) if journal else None
    done = book.load() if book is not None else {}
    if book is not None and world > 1:
        dist.barrier(group)  # every rank has read the journals before any rank appends
    done = {p.key: done[p.key] for p in plan if p.key in done}
    todo = [p for p in plan if p.key not in done]
    owners = assign_layers([p.cost for p in todo], world) if world > 1 else [0] * len(todo)
    mine = [p for p, owner in zip(todo, owners) if owner == rank]
    if done:
        logger.info("resuming: %d of %d tensors already analysed (%s)", len(done), len(plan), journal)
        if progress is not None and rank == 0:  # done before: a Progress keeps them out of its ETA
            getattr(progress, "skip", progress.update)(sum(len(r) for r in done.values()))
    results: dict[str, list[LayerRecord]] = dict(done)
    error = None
    try:
        for batch, records in _stream(mine, options, device, batch_bytes, progress if rank == 0 else None):
            for p, recs in zip(batch, records):
                results[p.key] = recs
                if book is not None:
                    book.append(p.key, recs)
            if book is not None:
                book.sync()
    except CheckpointFileError as exc:
        if world == 1:
            raise
        error = str(exc)
    finally:
        if book is not None:
            book.close()
    if world > 1:
        results = _share(results, error, group, world)
        if progress is not None and rank == 0:  # the other ranks' layers
            own = {p.key for p in mine}
            progress.update(sum(len(results[p.key]) for p in todo if p.key not in own))
    return AnalysisReport([r for p in plan for r in results[p.key]], options)


def _share(results: dict[str, list[LayerRecord]], error: str | None, group: Any, world: int) -> dict[str, list[LayerRecord]]:
    """Every rank's records (and failures) on every rank; a failure anywhere raises everywhere."""
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (error, results), group=group)
    failures = [f"rank {r}: {e}" for r, (e, _) in enumerate(everyone) if e]
    if failures:
        raise CheckpointFileError("; ".join(failures))
    merged: dict[str, list[LayerRecord]] = {}
    for _, part in everyone:
        merged.update(part)
    return merged
