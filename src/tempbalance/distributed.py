"""Balancing across ranks: split the per-layer eigen work by cost, then share the results.

Every rank plans the same owner per layer, measures only its own layers and receives the
others' results in one collective; FSDP2 (DTensor) weights are gathered to their owner only.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .analysis import AnalysisOptions, LayerRecord, analyze_layers
from .layers import LayerRef, MatrixOptions

__all__ = ["assign_layers", "distributed_analyze_layers", "layer_cost"]

logger = logging.getLogger(__name__)

# Numeric record fields shared through the collective, in column order.
_SHARED_FIELDS = (
    "num_eigs",
    "alpha",
    "xmin",
    "ks_distance",
    "tail_size",
    "lambda_max",
    "log_spectral_norm",
    "norm",
    "log_norm",
    "alpha_weighted",
    "stable_rank",
    "entropy",
)
_INT_FIELDS = ("num_eigs", "tail_size")
_HAS_REASON = len(_SHARED_FIELDS)  # extra column: 1.0 when the owner's record has a ``reason``
_COLUMNS = len(_SHARED_FIELDS) + 1


def _matrix_options(options: AnalysisOptions | MatrixOptions | None) -> MatrixOptions:
    if options is None:
        return MatrixOptions()
    if isinstance(options, MatrixOptions):
        return options
    if isinstance(options, AnalysisOptions):
        return options.matrix_options
    raise TypeError(f"options must be AnalysisOptions, MatrixOptions or None, got {type(options).__name__}")


def layer_cost(ref: LayerRef, options: AnalysisOptions | MatrixOptions | None = None) -> float:
    """Relative eigen cost of one layer: ``sum over its matrices of m * n * min(m, n)``.

    That is the flop count of the Gram product (the eigensolve of the ``min(m, n)``-square
    Gram matrix is of the same order). Computed from shapes alone, so it is cheap and equal
    on every rank, also for sharded (DTensor) weights.

    Args:
        ref: the layer (see :func:`tempbalance.find_layers`).
        options: how the weight becomes matrices (default: per-position convs).
    """
    batch, m, n = ref.stack_shape(_matrix_options(options))
    return float(batch) * m * n * min(m, n)


def assign_layers(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each layer: longest-first greedy bin packing onto the least-loaded rank.

    Layers are taken in order of decreasing cost (ties: lower index first) and each goes to
    the rank with the smallest load so far (ties: lower rank). The plan depends only on the
    inputs, so every rank computes the same one. The largest load is at most the optimal
    one plus the largest single cost (and at most 4/3 of optimal, Graham's bound).

    Args:
        costs: one finite, non-negative cost per layer (see :func:`layer_cost`).
        world_size: number of ranks (>= 1).

    Returns:
        ``owners[i]`` in ``range(world_size)`` for layer ``i``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an integer >= 1")
    values = [float(c) for c in costs]
    for i, c in enumerate(values):
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"costs[{i}]={costs[i]!r} must be a finite number >= 0")
    owners = [0] * len(values)
    loads = [(0.0, rank) for rank in range(world_size)]  # a heap of (load, rank)
    for i in sorted(range(len(values)), key=lambda j: (-values[j], j)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + values[i], rank))
    return owners


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


@dataclass
class _ShardPlan:
    """How one DTensor weight is brought to its owner.

    ``shard_dim`` is None for a fully replicated weight (the owner's local copy is complete);
    otherwise the weight's ``Shard(shard_dim)`` blocks live on ``members`` (global ranks, in
    the mesh group's order) and are gathered over ``pg`` to the owner.
    """

    shard_dim: int | None
    members: list[int]
    pg: Any
    sizes: list[int] = dataclasses.field(default_factory=list)


def _shard_plan(ref: LayerRef, owner_global: int, group_ranks: set[int]) -> _ShardPlan:
    """Validate a DTensor's layout and find the ranks whose shards make up the owner's copy."""
    from torch.distributed.tensor import Replicate, Shard

    w = ref.weight
    mesh = w.device_mesh
    shard_mesh_dims = []
    for mesh_dim, placement in enumerate(w.placements):
        if type(placement) is Shard:
            shard_mesh_dims.append((mesh_dim, placement.dim))
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"layer {ref.name!r}: DTensor placement {placement!r} is not supported; accepted: "
                "Shard(dim) on at most one mesh dimension (FSDP2 / HSDP) and Replicate()"
            )
    if len(shard_mesh_dims) > 1:
        raise NotImplementedError(
            f"layer {ref.name!r}: weight sharded on {len(shard_mesh_dims)} mesh dimensions {w.placements}; "
            "accepted: Shard(dim) on at most one mesh dimension (FSDP2 / HSDP) and Replicate()"
        )
    grid = mesh.mesh
    where = (grid == owner_global).nonzero()
    if where.shape[0] == 0:
        raise ValueError(
            f"layer {ref.name!r}: its owner (global rank {owner_global}) is not in the weight's device mesh "
            f"{grid.tolist()}; pass the mesh's process group as `group`"
        )
    if not shard_mesh_dims:
        return _ShardPlan(None, [owner_global], None)
    mesh_dim, tensor_dim = shard_mesh_dims[0]
    index = list(where[0].tolist())
    index[mesh_dim] = slice(None)
    members = [int(r) for r in grid[tuple(index)].reshape(-1).tolist()]
    outside = sorted(set(members) - group_ranks)
    if outside:
        raise ValueError(
            f"layer {ref.name!r}: ranks {outside} hold shards of it but are not in the balancing group; "
            "pass a group that contains the weight's whole device mesh (default: the world)"
        )
    pg = mesh.get_group(mesh_dim) if dist.get_rank() in members else None  # this rank's group along that dim
    return _ShardPlan(tensor_dim, members, pg)


def _comm_device(group: Any, refs: Sequence[LayerRef]) -> torch.device:
    """The device of the collective tensors: CPU for gloo, a CUDA device for NCCL."""
    weight = refs[0].weight
    device = weight.to_local().device if _is_dtensor(weight) else weight.device
    backend = str(dist.get_backend(group))
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _exchange_shard_sizes(
    plans: dict[int, _ShardPlan], refs: Sequence[LayerRef], device: torch.device, group: Any, group_ranks: list[int]
) -> None:
    """Fill ``plan.sizes`` (local block length of every member) with one all_gather on ``group``."""
    keys = sorted(i for i, p in plans.items() if p.shard_dim is not None)
    if not keys:
        return
    local = torch.tensor(
        [refs[i].weight.to_local().shape[plans[i].shard_dim] for i in keys], dtype=torch.int64, device=device
    )
    everyone = [torch.empty_like(local) for _ in group_ranks]
    dist.all_gather(everyone, local, group=group)
    table = torch.stack(everyone).cpu()  # (group size, layers)
    row_of = {global_rank: row for row, global_rank in enumerate(group_ranks)}
    for column, i in enumerate(keys):
        plans[i].sizes = [int(table[row_of[r], column]) for r in plans[i].members]


def _gather_to_owner(ref: LayerRef, plan: _ShardPlan, owner_global: int, device: torch.device) -> torch.Tensor | None:
    """The full weight on the owner (None elsewhere); every member of the shard group joins.

    Each member sends its row block padded to the largest block; the owner receives them
    into one buffer and drops the padding. Peak extra memory on the owner: one full weight
    (plus padding); on the others: one padded block.
    """
    local = ref.weight.to_local().detach()
    if plan.shard_dim is None:
        return local
    home = local.device
    block = local.movedim(plan.shard_dim, 0)
    bound = max(plan.sizes)
    send = torch.zeros((bound, *block.shape[1:]), dtype=block.dtype, device=device)
    send[: block.shape[0]] = block
    is_owner = dist.get_rank() == owner_global
    received, slots = None, None
    if is_owner:
        received = torch.empty((bound * len(plan.members), *block.shape[1:]), dtype=block.dtype, device=device)
        slots = list(received.chunk(len(plan.members)))
    dist.gather(send, slots, dst=owner_global, group=plan.pg)
    del send
    if not is_owner:
        return None
    filled = [k for k, size in enumerate(plan.sizes) if size]
    if all(size == bound for size in plan.sizes[: filled[-1] if filled else 0]):  # padding only after the data
        full = received[: sum(plan.sizes)]
    else:
        full = torch.cat([received[k * bound : k * bound + size] for k, size in enumerate(plan.sizes)])
    return full.movedim(0, plan.shard_dim).to(home)


def _placeholder(ref: LayerRef, shape: tuple[int, int, int]) -> LayerRecord:
    """A record with this layer's metadata; its numbers are filled from the owner's row."""
    batch, m, n = shape
    nan = float("nan")
    values = dict.fromkeys(_SHARED_FIELDS, nan)
    values.update(num_eigs=0, tail_size=0)
    return LayerRecord(
        name=ref.name,
        kind=ref.kind,
        shape=tuple(int(s) for s in ref.weight.shape),
        matrix_shape=(m, n),
        num_matrices=batch,
        frozen=ref.frozen,
        tied_names=list(ref.tied_names),
        **values,
    )


@torch.no_grad()
def distributed_analyze_layers(
    refs: Sequence[LayerRef],
    options: AnalysisOptions | None = None,
    progress: Any = None,
    *,
    group: Any = None,
) -> list[LayerRecord]:
    """Drop-in for :func:`tempbalance.analysis.analyze_layers` that splits the work across ranks.

    Without an initialised process group (or with one rank and no DTensor weights) this is
    ``analyze_layers``. Otherwise every rank of ``group`` must call it with the same layers
    (same model, same order): each layer gets one owner (:func:`assign_layers` on
    :func:`layer_cost`), each rank measures only the layers it owns, and one ``all_gather``
    of a ``(layers, 13)`` float64 table (the owner's row for each layer, copied bit for bit,
    so NaN and inf survive) gives every rank the same full list. Failure reasons, and the
    eigenvalues when ``options.keep_eigenvalues``, follow with ``all_gather_object`` only
    when there are any.

    FSDP2 weights (DTensor, ``Shard(dim)`` on one mesh dimension, replicated on any others)
    are gathered one layer at a time with ``dist.gather`` to the owner only: the other ranks
    send their blocks and never hold the full matrix. The owner of such a layer must be in
    the weight's device mesh (true with the default world group).

    Args:
        refs: the layers, identical on every rank.
        options: the measurement settings (default :class:`AnalysisOptions`).
        progress: optional object with ``update(n)``, advanced once per layer.
        group: process group to split the work over (default: the world).

    Returns:
        One :class:`LayerRecord` per layer, in order, equal on every rank and equal to the
        single-process result (the owner computes it with ``analyze_layers``).
    """
    options = options or AnalysisOptions()
    refs = list(refs)
    initialised = dist.is_available() and dist.is_initialized()
    has_dtensor = initialised and any(_is_dtensor(ref.weight) for ref in refs)
    if not refs or not initialised or (dist.get_world_size(group) == 1 and not has_dtensor):
        return analyze_layers(refs, options, progress)

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the given group")
    group_ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    mopts = options.matrix_options
    shapes = [ref.stack_shape(mopts) for ref in refs]
    costs = [float(b) * m * n * min(m, n) for b, m, n in shapes]
    owners = assign_layers(costs, world)
    owners_global = [group_ranks[r] for r in owners]
    device = _comm_device(group, refs)
    plans = {
        i: _shard_plan(ref, owners_global[i], set(group_ranks)) for i, ref in enumerate(refs) if _is_dtensor(ref.weight)
    }
    _exchange_shard_sizes(plans, refs, device, group, group_ranks)

    records: list[LayerRecord | None] = [None] * len(refs)
    mine = [i for i in range(len(refs)) if owners[i] == rank and i not in plans]
    for i, record in zip(mine, analyze_layers([refs[i] for i in mine], options, progress)):
        records[i] = record
    for i, plan in plans.items():  # ascending layer order: the same gather sequence on every rank
        if dist.get_rank() not in plan.members:
            continue
        full = _gather_to_owner(refs[i], plan, owners_global[i], device)
        if full is not None:
            (records[i],) = analyze_layers([dataclasses.replace(refs[i], weight=full)], options, progress)
            del full
    own = [i for i in range(len(refs)) if owners[i] == rank]
    logger.debug("rank %d/%d measured %d of %d layers (cost %.3g of %.3g)", rank, world, len(own), len(refs),
                 sum(costs[i] for i in own), sum(costs))

    table = torch.zeros((len(refs), _COLUMNS), dtype=torch.float64)
    for i in own:
        record = records[i]
        values = [float(getattr(record, name)) for name in _SHARED_FIELDS]
        table[i, : len(_SHARED_FIELDS)] = torch.tensor(values, dtype=torch.float64)
        table[i, _HAS_REASON] = float(record.reason is not None)
    table = table.to(device)
    gathered = [torch.empty_like(table) for _ in range(world)]
    dist.all_gather(gathered, table, group=group)
    rows = torch.stack([gathered[owners[i]][i] for i in range(len(refs))]).cpu()

    reasons = {i: records[i].reason for i in own if records[i].reason is not None}
    if bool(rows[:, _HAS_REASON].any()):
        reasons = _merge_objects(reasons, group, world)
    eigenvalues = {}
    if options.keep_eigenvalues:
        eigenvalues = _merge_objects({i: records[i].eigenvalues for i in own}, group, world)

    for i, ref in enumerate(refs):
        if records[i] is not None:
            continue
        record = _placeholder(ref, shapes[i])
        for column, name in enumerate(_SHARED_FIELDS):
            value = float(rows[i, column])
            setattr(record, name, int(value) if name in _INT_FIELDS else value)
        record.reason = reasons.get(i)
        record.eigenvalues = eigenvalues.get(i)
        records[i] = record
    if progress is not None and len(refs) > len(own):
        progress.update(len(refs) - len(own))
    return records  # type: ignore[return-value]


def _merge_objects(local: dict[int, Any], group: Any, world: int) -> dict[int, Any]:
    """Union of every rank's ``{layer index: object}`` (``all_gather_object``)."""
    everyone: list[dict[int, Any] | None] = [None] * world
    dist.all_gather_object(everyone, local, group=group)
    merged: dict[int, Any] = {}
    for part in everyone:
        merged.update(part or {})
    return merged
