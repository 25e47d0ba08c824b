"""Checkpoint files as tensor sources: which file holds which tensor, read one tensor at a time.

Resolves what a user points at (a ``.safetensors`` file, a Hugging Face model directory, a
``.bin`` / ``.pt`` / ``.pth`` state dict, ``hf:ORG/NAME[@REVISION]``, a state dict in memory) to
shards whose tensor list comes from their headers alone. safetensors and huggingface_hub are
imported only where such files are read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .errors import ConfigError

__all__ = [
    "CheckpointFileError",
    "CheckpointSource",
    "Shard",
    "TensorInfo",
    "dtype_policy",
    "find_state_dict",
    "natural_key",
    "open_checkpoint",
    "strip_wrapper_prefixes",
]

logger = logging.getLogger(__name__)

#: Keys under which training scripts nest their weights (searched in this order, 3 levels deep).
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")
#: Key prefixes of wrapped models: DataParallel / DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl")

# safetensors dtype names -> torch dtype (None: this torch build has none) and bytes per element
_FLOAT8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
SAFETENSORS_FLOATS: dict[str, torch.dtype | None] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    **{name: getattr(torch, attr, None) for name, attr in _FLOAT8.items()},
}
SAFETENSORS_SKIPPED = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": getattr(torch, "uint16", None),
    "I32": torch.int32, "U32": getattr(torch, "uint32", None), "I64": torch.int64, "U64": getattr(torch, "uint64", None),
}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1, "U8": 1, "I8": 1,
             "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class CheckpointFileError(ConfigError):
    """A checkpoint that cannot be read: the message names the file and what is wrong."""


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``layers.2`` before ``layers.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text))


def dtype_policy(dtype: torch.dtype | None) -> str:
    """``"analyse"`` (floating point, upcast to float32 / kept float64), ``"skip"`` (integer and
    bool tensors: masks, indices, quantised weights) or ``"unsupported"`` (complex, or a stored
    dtype this torch build cannot hold)."""
    if dtype is None or dtype.is_complex:
        return "unsupported"
    return "analyse" if dtype.is_floating_point else "skip"


def readable_dtypes() -> str:
    """The floating dtypes a checkpoint tensor may have, for error messages."""
    names = [name for name, dtype in SAFETENSORS_FLOATS.items() if dtype is not None]
    return ", ".join(names) + " (integer and bool tensors are skipped)"


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor, known from a header (nothing read).

    Attributes:
        key: the state-dict key (wrapper prefixes removed).
        shape: its shape.
        dtype: its torch dtype, None when torch cannot hold the stored one.
        stored_dtype: the dtype as the file names it (``"BF16"``, ``"torch.bfloat16"``).
        shard: the file that holds it.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    stored_dtype: str
    shard: "Shard" = field(repr=False, compare=False)

    def meta(self) -> torch.Tensor:
        """A meta tensor of this shape and dtype (float32 when the dtype is unreadable)."""
        return torch.empty(self.shape, dtype=self.dtype or torch.float32, device="meta")


class Shard:
    """One file of a checkpoint (or an in-memory state dict): its tensors and how to read one."""

    label: str = "<memory>"
    size: int = 0

    def tensors(self) -> list[TensorInfo]:
        """The stored tensors, in the file's order."""
        raise NotImplementedError

    def ties(self) -> dict[str, list[str]]:
        """``{first key: [other keys sharing its storage]}`` (tied weights stored twice)."""
        return {}

    def read(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``, in its stored dtype on the CPU (a fresh copy or a
        mapping of this tensor alone: nothing else of the file stays in memory)."""
        raise NotImplementedError

    def prefetch(self, key: str) -> None:
        """Let the operating system start reading ``key``'s bytes in the background, so that a
        later :meth:`read` finds them in the page cache (does nothing where that is unsupported)."""


# ----------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's JSON header, validated against the file size.

    Each entry gains ``file_offsets``: its data's ``[begin, end)`` bytes counted from the start of
    the file (``data_offsets`` count from the end of the header).

    Raises:
        CheckpointFileError: a file too short for its header, a header that is not JSON, an
            entry without dtype / shape / offsets, or data that ends past the end of the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointFileError(f"{path}: not a safetensors file ({size} bytes, less than the 8-byte header length)")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, _MAX_HEADER):
            raise CheckpointFileError(
                f"{path}: truncated or not a safetensors file (its first 8 bytes announce a {length}-byte header; "
                f"the file has {size} bytes)"
            )
        text = handle.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFileError(f"{path}: not a safetensors file (its header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path}: not a safetensors file (its header is a {type(header).__name__}, not a JSON object)")
    data_bytes = size - 8 - length
    entries = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        entry = _checked_entry(path, key, entry, data_bytes)
        begin, end = entry["data_offsets"]
        entries[key] = {**entry, "file_offsets": [8 + length + begin, 8 + length + end]}
    return entries


def _checked_entry(path: Path, key: str, entry: Any, data_bytes: int) -> dict[str, Any]:
    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and isinstance(entry.get("shape"), list)
        and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and all(isinstance(o, int) for o in entry["data_offsets"])
    )
    if not ok:
        raise CheckpointFileError(f"{path}: corrupt safetensors header: entry {key!r} lacks a dtype, shape or data_offsets")
    begin, end = entry["data_offsets"]
    if not 0 <= begin <= end:
        raise CheckpointFileError(f"{path}: corrupt safetensors header: tensor {key!r} has data_offsets {entry['data_offsets']}")
    if end > data_bytes:
        raise CheckpointFileError(
            f"{path}: truncated: tensor {key!r} ends at data byte {end}, but the file holds {data_bytes} data bytes"
        )
    itemsize = _ITEMSIZE.get(entry["dtype"])
    if itemsize is not None and end - begin != math.prod(entry["shape"]) * itemsize:
        raise CheckpointFileError(
            f"{path}: corrupt safetensors header: tensor {key!r} ({entry['dtype']}, shape {entry['shape']}) "
            f"should take {math.prod(entry['shape']) * itemsize} bytes, its offsets span {end - begin}"
        )
    return entry


class SafetensorsShard(Shard):
    """A ``.safetensors`` file: the tensor list from its header; each read maps the file for that
    one tensor (``safetensors.safe_open``) and unmaps it, so no other tensor's pages stay resident."""

    def __init__(self, path: Path):
        self.path = path
        self.label = str(path)
        self.size = path.stat().st_size
        self._entries = read_safetensors_header(path)

    def tensors(self) -> list[TensorInfo]:
        out = []
        for key, entry in self._entries.items():
            name = entry["dtype"]
            dtype = SAFETENSORS_FLOATS.get(name, SAFETENSORS_SKIPPED.get(name))
            out.append(TensorInfo(key, tuple(entry["shape"]), dtype, name, self))
        return out

    def prefetch(self, key: str) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        begin, end = self._entries[key]["file_offsets"]
        try:
            descriptor = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, begin, end - begin, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(descriptor)
        except OSError as exc:  # only a hint: reading will report a real problem
            logger.debug("prefetch of %r from %s failed: %s", key, self.path, exc)

    def read(self, key: str) -> torch.Tensor:
        try:
            from safetensors import safe_open
        except ImportError as exc:
            raise ImportError("reading .safetensors files needs safetensors: pip install 'tempbalance[checkpoints]'") from exc
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                return handle.get_tensor(key)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointFileError(f"{self.path}: cannot read tensor {key!r}: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------- torch files


def _numpy_safe_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` needs for numpy arrays (the RNG states of training
    checkpoints): array reconstruction and the dtype classes, no code."""
    core = getattr(np, "_core", None) or np.core
    dtype_classes = [type(np.dtype(t)) for t in (np.uint8, np.int32, np.int64, np.uint32, np.uint64, np.float32, np.float64, np.bool_)]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtype_classes]


def _needs_code(error: Exception) -> bool:
    """True when ``weights_only=True`` refused a file because it pickles other objects."""
    text = str(error)
    return "Unsupported global" in text or "GLOBAL " in text


def load_torch_file(path: Path, *, allow_pickle: bool = False) -> Any:
    """``torch.load`` of ``path`` on the CPU with ``weights_only=True`` (numpy arrays allowed),
    memory-mapped when the file is in the zip format.

    Args:
        allow_pickle: when the file pickles other objects (a whole ``nn.Module``), unpickle it in
            full: this runs code from the file, so only for files you trust.

    Raises:
        CheckpointFileError: an unreadable file, or one that needs unpickling of code without
            ``allow_pickle``.
    """
    return _load_torch(path, allow_pickle)[0]


def _load_torch(path: Path, allow_pickle: bool, mmap: bool = True) -> tuple[Any, bool]:
    """:func:`load_torch_file`, and whether the tensors are memory-mapped."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), mmap
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        if mmap and "mmap" in str(exc) and "zipfile" in str(exc):  # the legacy (non-zip) format cannot be mapped
            return _load_torch(path, allow_pickle, mmap=False)
        if not _needs_code(exc):
            raise CheckpointFileError(f"{path}: cannot read it as a torch file: {_first_line(exc)}") from exc
        if not allow_pickle:
            culprit = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f" (it refers to {culprit.group(1)})" if culprit else ""
            raise CheckpointFileError(
                f"{path}: holds pickled Python objects, not only tensors{what}; reading it would run code from the "
                "file: save a state dict (model.state_dict()) instead, or pass --allow-pickle / allow_pickle=True "
                "if you trust the file"
            ) from exc
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as exc:
        raise CheckpointFileError(
            f"{path}: {exc} (the pickled model's class is not importable here; save model.state_dict() instead)"
        ) from exc
    except Exception as exc:  # noqa: BLE001
        raise CheckpointFileError(f"{path}: cannot unpickle it: {type(exc).__name__}: {_first_line(exc)}") from exc
    logger.debug("%s holds pickled objects: unpickled it in full (allow_pickle)", path)
    return loaded, False


def _first_line(exc: Exception) -> str:
    """The informative line of an error: after torch's "WeightsUnpickler error:" preamble if any."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def find_state_dict(obj: Any, depth: int = 3) -> Mapping[str, torch.Tensor] | nn.Module | None:
    """The weights inside a loaded checkpoint: ``obj`` itself when it is a state dict (string keys,
    tensor values) or a module, else the first of :data:`STATE_DICT_KEYS` that holds one, searched
    ``depth`` levels down (``{"model": ...}``, ``{"state_dict": ...}``, a training checkpoint with
    optimizer state beside the weights). None when there is none."""
    if isinstance(obj, nn.Module) or _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping) and depth > 0:
        for key in STATE_DICT_KEYS:
            found = find_state_dict(obj.get(key), depth - 1)
            if found is not None:
                return found
    return None


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes from every key, nested in
    any order (torch's ``consume_prefix_in_state_dict_if_present``, repeated), keeping the key order.

    Returns a new ``OrderedDict`` (``state`` is left as it is); a state dict's ``_metadata`` (the
    modules' versions that ``load_state_dict`` reads) is renamed with its keys.
    """
    positions: OrderedDict[str, int] = OrderedDict((key, i) for i, key in enumerate(state))
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        positions._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    while any(key.startswith(WRAPPER_PREFIXES) for key in positions):
        for prefix in WRAPPER_PREFIXES:
            consume_prefix_in_state_dict_if_present(positions, prefix)
    values = list(state.values())  # consume moves each renamed key to the end: put them back in place
    stripped = OrderedDict((key, values[i]) for key, i in sorted(positions.items(), key=lambda item: item[1]))
    if metadata is not None:
        stripped._metadata = positions._metadata  # type: ignore[attr-defined]
    return stripped


def _storage_ties(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Keys whose tensors are the same view of the same storage, grouped under the first one."""
    first: dict[tuple, str] = {}
    ties: dict[str, list[str]] = {}
    for key, t in state.items():
        if t.device.type == "meta":
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in first:
            ties.setdefault(first[ident], []).append(key)
        else:
            first[ident] = key
    return ties


class StateDictShard(Shard):
    """An in-memory state dict (``tempbalance.analyze(state_dict)``)."""

    def __init__(self, state: Mapping[str, torch.Tensor], label: str = "<state dict>"):
        self.label = label
        self._state = strip_wrapper_prefixes(state)
        self.size = sum(t.numel() * t.element_size() for t in self._state.values())

    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(k, tuple(t.shape), t.dtype, str(t.dtype), self) for k, t in self._state.items()]

    def ties(self) -> dict[str, list[str]]:
        return _storage_ties(self._state)

    def read(self, key: str) -> torch.Tensor:
        return self._state[key].detach()


class TorchShard(Shard):
    """A torch file (``.bin`` / ``.pt`` / ``.pth``) holding a state dict, possibly nested and prefixed.

    The tensor list comes from one memory-mapped load (nothing read); each :meth:`read` maps
    the file again and keeps only that tensor, so no other tensor's pages stay resident. A file
    in torch's legacy format (which cannot be mapped) is loaded whole once and kept.
    """

    def __init__(self, path: Path, *, allow_pickle: bool = False, loaded: tuple[Any, bool] | None = None):
        self.path = path
        self.label = str(path)
        self.size = path.stat().st_size
        self.allow_pickle = allow_pickle
        self._kept: dict[str, torch.Tensor] | None = None
        obj, mapped = _load_torch(path, allow_pickle) if loaded is None else loaded
        state = self._state(obj)
        self._infos = [TensorInfo(k, tuple(t.shape), t.dtype, str(t.dtype), self) for k, t in state.items()]
        self._ties = _storage_ties(state)
        if not mapped:
            logger.info("%s cannot be memory-mapped (legacy format or pickled objects): keeping it loaded", path)
            self._kept = state

    def _state(self, obj: Any) -> dict[str, torch.Tensor]:
        found = find_state_dict(obj)
        if isinstance(found, nn.Module):
            found = found.state_dict()
        if found is None:
            keys = f" (top-level keys: {', '.join(map(str, list(obj)[:8]))})" if isinstance(obj, Mapping) else ""
            raise CheckpointFileError(
                f"{self.path}: holds neither a state dict nor a model{keys}; looked for tensors at the top level "
                f"and under {', '.join(STATE_DICT_KEYS)}"
            )
        return strip_wrapper_prefixes(found)

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def ties(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self._ties.items()}

    def read(self, key: str) -> torch.Tensor:
        if self._kept is not None:
            return self._kept[key]
        state = self._state(_load_torch(self.path, self.allow_pickle)[0])
        tensor = state[key]
        del state
        return tensor


# ----------------------------------------------------------------------------- sources


@dataclass
class CheckpointSource:
    """The tensors of a checkpoint, across its shards.

    Attributes:
        description: what was opened (for messages and reports).
        shards: the files, in reading order.
        ties: ``{key: [other keys or names with the same weight]}`` (tied weights).
        sort_keys: report tensors in natural key order (safetensors headers are sorted by
            name, not by module order); otherwise in stored order.
    """

    description: str
    shards: list[Shard]
    ties: dict[str, list[str]] = field(default_factory=dict)
    sort_keys: bool = False

    def tensors(self) -> list[TensorInfo]:
        """Every stored tensor once (a tied duplicate is listed under its first key only), in
        report order."""
        aliases = {other for others in self.ties.values() for other in others}
        infos = [info for shard in self.shards for info in shard.tensors() if info.key not in aliases]
        return sorted(infos, key=lambda i: natural_key(i.key)) if self.sort_keys else infos

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this checkpoint for a resumed analysis: file names and sizes."""
        return {"files": [[Path(s.label).name, s.size] for s in self.shards]}


def open_checkpoint(source: Any, *, allow_pickle: bool = False) -> CheckpointSource | nn.Module:
    """Resolve a checkpoint source to its shards (headers read, no tensor data).

    Args:
        source: a path (``.safetensors`` file, torch file, or a directory: a Hugging Face model
            directory, a ``tempbalance train`` run directory), ``"hf:ORG/NAME[@REVISION]"``,
            or a state dict (``{key: tensor}``, possibly nested as in a training checkpoint).
        allow_pickle: unpickle torch files that hold more than tensors (runs code from the file).

    Returns:
        A :class:`CheckpointSource`, or the ``nn.Module`` a torch file holds (``allow_pickle``).

    Raises:
        FileNotFoundError: no such path.
        CheckpointFileError: a file or directory that holds no readable weights (the message
            names the file and what is wrong).
    """
    if isinstance(source, Mapping):
        found = find_state_dict(source)
        if isinstance(found, nn.Module):
            return found
        if found is None:
            raise CheckpointFileError(
                f"the given dict holds no state dict (string keys, tensor values) at its top level or under "
                f"{', '.join(STATE_DICT_KEYS)}"
            )
        shard = StateDictShard(found)
        return CheckpointSource("<state dict>", [shard], shard.ties())
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = text.decode()
    if text.startswith("hf:"):
        directory = resolve_hf(text)
        return _open_directory(directory, allow_pickle, description=text)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file or directory: {text!r}")
    if path.is_dir():
        return _open_directory(path, allow_pickle)
    if path.suffix == ".safetensors":
        return CheckpointSource(str(path), [SafetensorsShard(path)], sort_keys=True)
    loaded = _load_torch(path, allow_pickle)
    found = find_state_dict(loaded[0])
    if isinstance(found, nn.Module):
        return found
    shard = TorchShard(path, allow_pickle=allow_pickle, loaded=loaded)
    return CheckpointSource(str(path), [shard], shard.ties())


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFileError(f"{path}: not a readable index file: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFileError(f"{path}: not a shard index (no \"weight_map\": {{tensor key: shard file}})")
    return weight_map


def _indexed_shards(index: Path, allow_pickle: bool) -> list[Shard]:
    """The shards an index names, in natural file-name order, checked to exist and to hold the
    tensors the index says they hold."""
    weight_map = _read_index(index)
    names = sorted(set(weight_map.values()), key=natural_key)
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointFileError(
            f"{index}: names shard(s) {', '.join(missing[:3])}{more}, missing from {index.parent}"
        )
    shards = [_open_file(index.parent / n, allow_pickle) for n in names]
    held = {name: {i.key for i in shard.tensors()} for name, shard in zip(names, shards)}
    absent = [(k, n) for k, n in weight_map.items() if k not in held[n]]
    if absent:
        key, name = absent[0]
        raise CheckpointFileError(f"{index}: says tensor {key!r} is in {name}, which does not hold it ({len(absent)} such)")
    return shards


def _open_file(path: Path, allow_pickle: bool) -> Shard:
    if path.suffix == ".safetensors":
        return SafetensorsShard(path)
    return TorchShard(path, allow_pickle=allow_pickle)


def _open_directory(directory: Path, allow_pickle: bool, description: str | None = None) -> CheckpointSource:
    """A directory: safetensors (by index, ``model.safetensors`` or every ``*.safetensors``),
    else ``pytorch_model*.bin`` (same order of preference), else a ``tempbalance train`` run's
    ``checkpoint.pt``, else its single torch file."""
    description = description or str(directory)
    files = sorted((p for p in directory.iterdir() if p.is_file()), key=lambda p: natural_key(p.name))
    for suffix, single in ((".safetensors", "model.safetensors"), (".bin", "pytorch_model.bin")):
        indexes = [p for p in files if p.name.endswith(f"{suffix}.index.json")]
        preferred = [p for p in indexes if p.name == f"{single}.index.json"] or indexes
        if len(preferred) > 1:
            raise CheckpointFileError(f"{directory}: several shard indexes ({', '.join(p.name for p in preferred)}); name one file")
        if preferred:
            shards = _indexed_shards(preferred[0], allow_pickle)
        elif (directory / single).is_file():
            shards = [_open_file(directory / single, allow_pickle)]
        else:
            matching = [p for p in files if p.suffix == suffix and (suffix == ".safetensors" or p.name.startswith("pytorch_model"))]
            if not matching:
                continue
            shards = [_open_file(p, allow_pickle) for p in matching]
        source = CheckpointSource(description, shards, sort_keys=suffix == ".safetensors")
        for shard in shards:
            source.ties.update(shard.ties())
        _add_config_ties(directory, source)
        return source
    run_checkpoint = directory / "checkpoint.pt"
    candidates = [run_checkpoint] if run_checkpoint.is_file() else [p for p in files if p.suffix in TORCH_SUFFIXES]
    if len(candidates) == 1:
        shard = TorchShard(candidates[0], allow_pickle=allow_pickle)
        return CheckpointSource(description, [shard], shard.ties())
    found = f"; it holds several candidates ({', '.join(p.name for p in candidates[:5])}): name one file" if candidates else ""
    raise CheckpointFileError(
        f"{directory}: no checkpoint weights found: looked for *.safetensors (with model.safetensors.index.json), "
        f"pytorch_model*.bin (with its index), checkpoint.pt, or a single .pt/.pth/.bin/.ckpt file{found}"
    )


def _add_config_ties(directory: Path, source: CheckpointSource) -> None:
    """A Hugging Face model saved with tied word embeddings stores ``lm_head.weight`` once, as the
    input embedding: when ``config.json`` says ``"tie_word_embeddings": true`` and the files hold
    no ``lm_head.weight``, list ``lm_head`` under the one embedding of ``vocab_size`` rows."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(config, dict) or config.get("tie_word_embeddings") is not True:
        return
    infos = source.tensors()
    if any(i.key == "lm_head.weight" for i in infos):
        return
    vocab = config.get("vocab_size")
    embeddings = [
        i for i in infos
        if len(i.shape) == 2 and i.key.endswith(".weight") and re.search(r"(?i)emb|wte", i.key)
        and (vocab is None or i.shape[0] == vocab)
    ]
    if len(embeddings) == 1:
        source.ties.setdefault(embeddings[0].key, []).append("lm_head.weight")


# ----------------------------------------------------------------------------- Hugging Face Hub

_HF_SPEC = re.compile(r"^hf:(?P<repo>[\w.-]+(?:/[\w.-]+)?)(?:@(?P<revision>[\w./-]+))?$")


def resolve_hf(spec: str) -> Path:
    """The local snapshot directory of ``hf:ORG/NAME[@REVISION]``: the Hugging Face cache's copy
    when it holds that revision's weights, else a download of its weights and JSON files
    (safetensors when the repository has them, else ``pytorch_model*.bin``).

    Raises:
        ConfigError: a malformed spec, or huggingface_hub missing.
        CheckpointFileError: neither the cache nor the Hub could provide the weights (says which
            cache was searched and why the download failed).
    """
    match = _HF_SPEC.match(spec)
    if match is None:
        raise ConfigError(f"{spec!r} is not a Hugging Face source; accepted: hf:ORG/NAME or hf:ORG/NAME@REVISION")
    repo, revision = match["repo"], match["revision"]
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
    except ImportError as exc:
        raise ConfigError(f"{spec}: hf: sources need huggingface_hub: pip install 'tempbalance[checkpoints]'") from exc
    cache = constants.HF_HUB_CACHE
    try:
        local = Path(snapshot_download(repo, revision=revision, local_files_only=True))
        _open_directory(local, allow_pickle=False)
        return local
    except Exception as exc:  # noqa: BLE001 - not cached, or cached without (complete) weights
        cached = f"not in the local Hugging Face cache ({cache}): {_first_line(exc)}"
    try:
        files = HfApi().list_repo_files(repo, revision=revision)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
        return Path(snapshot_download(repo, revision=revision, allow_patterns=[*weights, "*.json"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repository, no access, ...
        raise CheckpointFileError(
            f"{spec}: {cached}; and downloading it failed ({type(exc).__name__}: {_first_line(exc)}). "
            "Run where the Hub is reachable, or point HF_HUB_CACHE / HF_HOME at a cache that holds it"
        ) from exc
