"""Where a layer sits from its name alone (Transformer block index, module type within the
block) and alpha summaries per block or per module type, as AlphaPruning / AlphaDecay report them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["GROUP_BY", "GroupSummary", "alpha_by_depth", "block_index", "module_type", "summarize"]

GROUP_BY = ("block", "module")

#: A block: ``model.layers.N.``, ``transformer.h.N.``, ``encoder.layer.N.``, ``blocks.N.``,
#: ``layers.N.`` (any prefix; the first such component of the name counts).
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|blocks|block|h)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The Transformer block of a layer name, or None outside every block.

    ``"model.layers.3.self_attn.q_proj"`` -> 3; ``"transformer.h.11.mlp.c_fc"`` -> 11;
    ``"bert.encoder.layer.0.attention.self.query"`` -> 0; ``"lm_head"`` -> None.
    """
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def module_type(name: str) -> str:
    """The layer's path inside its block, which names its role there: ``self_attn.q_proj``,
    ``mlp.down_proj``, ``attn.c_attn``, ``attn.c_proj`` (GPT-2's attention output) apart from
    ``mlp.c_proj``; a split projection keeps its part (``attn.c_attn.q``). A layer outside every
    block is its own type (its full name: ``lm_head``, ``model.embed_tokens``)."""
    match = _BLOCK.search(name)
    return name[match.end() :] if match else name


@dataclass(frozen=True)
class GroupSummary:
    """Alpha over the layers of one group.

    Attributes:
        group: the block index (``int``; ``None`` for the layers outside every block) or the
            module type.
        layers: layers in the group; ``fitted``: those with a finite alpha.
        mean_alpha, median_alpha, min_alpha, max_alpha: over the fitted layers (NaN if none).
    """

    group: Any
    layers: int
    fitted: int
    mean_alpha: float
    median_alpha: float
    min_alpha: float
    max_alpha: float

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarize(records: Sequence[Any], by: str) -> list[GroupSummary]:
    """Alpha per block (``by="block"``: blocks in index order, then the layers outside blocks)
    or per module type (``by="module"``: in order of first appearance). Failed fits (NaN alpha)
    count in ``layers`` but not in the statistics.

    Args:
        records: :class:`tempbalance.LayerRecord` s (anything with ``name`` and ``alpha``).
        by: ``"block"`` or ``"module"``.
    """
    if by not in GROUP_BY:
        raise ValueError(f"by={by!r} is not one of {GROUP_BY}")
    key = block_index if by == "block" else module_type
    members: dict[Any, list[float]] = {}
    for record in records:
        members.setdefault(key(record.name), []).append(float(record.alpha))
    order = list(members)
    if by == "block":
        order = sorted((g for g in order if g is not None)) + ([None] if None in members else [])
    out = []
    for group in order:
        finite = [a for a in members[group] if math.isfinite(a)]
        nan = float("nan")
        out.append(GroupSummary(
            group=group,
            layers=len(members[group]),
            fitted=len(finite),
            mean_alpha=sum(finite) / len(finite) if finite else nan,
            median_alpha=_median(finite) if finite else nan,
            min_alpha=min(finite) if finite else nan,
            max_alpha=max(finite) if finite else nan,
        ))
    return out


def alpha_by_depth(records: Sequence[Any]) -> dict[str, tuple[list[int], list[float]]]:
    """``{module type: (block indices, alphas)}`` for the layers inside numbered blocks, each
    series in block order; failed fits (NaN alpha) are left out. Types in order of first appearance."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        block = block_index(record.name)
        alpha = float(record.alpha)
        if block is not None and math.isfinite(alpha):
            series.setdefault(module_type(record.name), []).append((block, alpha))
    return {kind: ([b for b, _ in sorted(points)], [a for _, a in sorted(points)]) for kind, points in series.items()}
