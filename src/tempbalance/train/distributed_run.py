"""Data-parallel runs of the training loop: detect a torchrun launch, set up and tear down the
process group, wrap the model in DDP, and the few collectives the loop needs (sums, stop flag).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, spell

__all__ = [
    "Launch", "DistContext", "StopVote", "detect_launch", "distributed_context", "wrap_model", "rank_seed", "summed"
]

log = logging.getLogger(__name__)

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch: global ``rank`` in ``[0, world_size)`` and
    ``local_rank`` (its index on this machine, which picks its GPU)."""

    rank: int
    world_size: int
    local_rank: int


def _env_int(name: str, environ: dict[str, str]) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer (as torchrun sets it)") from None


def detect_launch(environ: dict[str, str] | None = None) -> Launch | None:
    """The torchrun launch this process belongs to, or None for a plain single-process run.

    A launch is recognised by ``RANK`` and ``WORLD_SIZE`` in the environment (``LOCAL_RANK``
    defaults to 0); a world of one process counts as no launch.

    Raises:
        ConfigError: a variable that is not an integer, or a rank outside ``[0, WORLD_SIZE)``.
    """
    environ = dict(os.environ) if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    rank, world = _env_int("RANK", environ), _env_int("WORLD_SIZE", environ)
    local = _env_int("LOCAL_RANK", environ) if "LOCAL_RANK" in environ else 0
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(
            f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
        )
    return None if world == 1 else Launch(rank, world, local)


@dataclass
class DistContext:
    """The run's place among its ranks; with ``world_size == 1`` every method is a local no-op.

    Attributes:
        rank, world_size, local_rank: as in :class:`Launch` (0, 1, 0 when not distributed).
        backend: the default group's backend (``"nccl"`` / ``"gloo"``), None when not distributed.
        control: a gloo group for CPU-side agreement (stop flag, small objects); the default group
            when that is already gloo.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    control: Any = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and shows progress."""
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``values`` over all ranks (a new tensor; same device and dtype)."""
        total = values.clone()
        if self.enabled:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def max_int(self, value: int) -> int:
        """The largest of every rank's ``value`` (CPU collective on the control group)."""
        if not self.enabled:
            return int(value)
        flag = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return int(flag.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; other ranks' argument is ignored)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (pickled)."""
        if not self.enabled:
            return [obj]
        boxes: list[Any] = [None] * self.world_size
        dist.all_gather_object(boxes, obj, group=self.control)
        return boxes

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.enabled:
            dist.barrier(group=self.control)

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        Under DDP each rank's last training batch updates its own BatchNorm statistics; after
        this call all ranks evaluate and save exactly the model rank 0 checkpoints.
        """
        if not self.enabled:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


class StopVote:
    """Agreement on a stop flag once per batch without waiting for the network.

    The vote cast before batch ``i`` is read before batch ``i + 1``, so its all-reduce overlaps a
    batch of compute (one gloo all-reduce of one integer costs about 0.1-1 ms). Every rank casts and
    reads the same votes in the same order, so all ranks stop at the same batch, one batch after the
    signal. Single process: :meth:`cast` returns the value at once.
    """

    def __init__(self, context: DistContext) -> None:
        self.context = context
        self._pending: tuple[Any, torch.Tensor] | None = None

    def cast(self, value: int) -> int:
        """Cast this rank's ``value`` (0 = go on); return the agreed (largest) value of the previous
        cast, 0 for the first one."""
        if not self.context.enabled:
            return int(value)
        agreed = self.close()
        flag = torch.tensor([int(value)], dtype=torch.int64)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.context.control, async_op=True)
        self._pending = (work, flag)
        return agreed

    def settle(self, value: int) -> int:
        """Wait for the outstanding vote and agree on ``value`` now; the larger of the two results."""
        return max(self.close(), self.context.max_int(value))

    def close(self) -> int:
        """Wait for the outstanding vote, if any; return its agreed value (0 when none)."""
        if self._pending is None:
            return 0
        work, flag = self._pending
        self._pending = None
        work.wait()
        return int(flag.item())


def _device_for(name: str, launch: Launch) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK for ``auto`` (with CUDA) and ``cuda``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(
            f"{spell('device', name)} under torchrun: accepted are cpu (gloo), cuda and auto (NCCL on cuda:LOCAL_RANK)"
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{spell('device', name)} but CUDA is not available here; use {spell('device', 'cpu')} or "
            f"{spell('device', 'auto')}"
        )
    if device.index is not None:
        raise ConfigError(
            f"{spell('device', name)} under torchrun: each process uses cuda:LOCAL_RANK; pass "
            f"{spell('device', 'cuda')} or {spell('device', 'auto')}"
        )
    if launch.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={launch.local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
            "start at most that many processes per machine (--nproc-per-node)"
        )
    return torch.device("cuda", launch.local_rank)


@contextlib.contextmanager
def distributed_context(
    device_name: str, launch: Launch | None = None
) -> Iterator[tuple[DistContext, torch.device | None]]:
    """Set up the process group of a torchrun launch for one run; tear it down afterwards.

    Yields ``(context, device)``. Without a launch (see :func:`detect_launch`) the context is the
    single-process one and ``device`` is None (the caller resolves it). Under a launch the device
    is ``cuda:LOCAL_RANK`` (NCCL backend) for ``auto``/``cuda`` with CUDA present, else the CPU
    (gloo). A process group that the caller already initialised is used and left alone;
    one initialised here is destroyed on exit.
    """
    launch = detect_launch() if launch is None else launch
    if launch is None and not (dist.is_available() and dist.is_initialized()):
        yield DistContext(), None
        return
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run a single process instead of torchrun")
    owned = not dist.is_initialized()
    if launch is None:  # a process group the caller set up
        if dist.get_world_size() == 1:
            yield DistContext(), None
            return
        launch = Launch(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    device = _device_for(device_name, launch)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    control = None
    try:
        if owned:
            backend = "nccl" if device.type == "cuda" else "gloo"
            init_kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size, **init_kwargs)
        backend = str(dist.get_backend())
        if dist.get_world_size() != launch.world_size or dist.get_rank() != launch.rank:
            raise ConfigError(
                f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
                f"RANK={launch.rank}, WORLD_SIZE={launch.world_size}"
            )
        control = None if backend == "gloo" else dist.new_group(backend="gloo")
        context = DistContext(launch.rank, launch.world_size, launch.local_rank, backend, control)
        log.info("rank %d of %d (%s) on %s", launch.rank, launch.world_size, backend, device)
        yield context, device
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
        elif control is not None:
            dist.destroy_process_group(control)


def wrap_model(model: nn.Module, context: DistContext, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` (unchanged when not distributed).

    ``sync_bn`` first converts BatchNorm layers to ``SyncBatchNorm`` (statistics over the global
    batch; CUDA only); by default each rank normalises with its own batch, as DDP does.
    The parameters stay the same objects, so an optimizer built on ``model`` keeps working.
    """
    if not context.enabled:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ConfigError(f"sync_bn=True needs CUDA devices (SyncBatchNorm); this run is on {device}")
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if converted is not model:
            raise ConfigError("sync_bn=True: the model itself is a BatchNorm layer; nothing to wrap around it")
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for the random stream of ``rank``, drawn from ``(seed, rank)``."""
    words = np.random.SeedSequence([int(seed), int(rank)]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def summed(context: DistContext, values: Sequence[torch.Tensor]) -> list[float]:
    """Every rank's ``values`` (0-dim tensors on one device) summed over ranks, as floats."""
    stacked = torch.stack([value.detach().to(torch.float64) for value in values])
    return [float(v) for v in context.sum(stacked).tolist()]
