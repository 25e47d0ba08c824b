"""The settings of one training run (:class:`TrainConfig`), their validation, and which of them
a resumed run may change.

Every field is a plain value so a config round-trips through ``config.json`` and sweep files. The
class docstring's ``Attributes`` section is the help text of each field's command-line flag.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, Placeholder, spell
from ..farms import ESD_MODES

__all__ = [
    "TrainConfig",
    "BOOKKEEPING_FIELDS",
    "NUMERICS_FIELDS",
    "RESULT_NEUTRAL_FIELDS",
    "NOT_READ_BACK",
    "FITS",
    "METRICS",
    "parse_value",
    "RENAMED_FIELDS",
]

FITS = ("median", "ks", "fix-finger")
METRICS = ("alpha", "alphahat", "spectral_norm")
AMP_MODES = ("auto", "bf16", "off")
NORMALIZE = ("none", "mean")
NORM_FOLLOWS = ("order", "name", "none")

# Old field names still read from config.json, checkpoints and sweep files: old -> new.
RENAMED_FIELDS = {"tb_async": "asynchronous"}

# Fields that never change a number of the run: a resumed run may change them freely.
BOOKKEEPING_FIELDS = frozenset(
    {"out", "data_dir", "download", "resume", "overwrite", "progress", "stop_after", "tag"}
)
# Fields that change the arithmetic but not the experiment: a resumed run may change them, with a
# warning that the result is no longer bit-identical to an uninterrupted run.
NUMERICS_FIELDS = frozenset({"num_threads", "compile", "deterministic", "device"})
# Every field that may differ between a run and its resumption (all others must be equal).
RESULT_NEUTRAL_FIELDS = BOOKKEEPING_FIELDS | NUMERICS_FIELDS
# Fields a resume does not read back from the run (they describe this invocation, not the run).
NOT_READ_BACK = frozenset({"out", "resume", "overwrite", "stop_after", "progress"})


@dataclass
class TrainConfig:
    """One training run. Defaults are the paper's CIFAR setup (200 epochs, SGD momentum 0.9, wd 5e-4, batch 128).

    Attributes:
        dataset: a name in ``tempbalance.train.data.DATASETS`` (e.g. ``"cifar10"``, ``"mnist1d"``).
        model: a name in ``tempbalance.train.models.MODEL_NAMES``; empty = the data set's default.
        method: a name in ``tempbalance.train.methods.METHODS`` (``cal``, ``snr``, ``tb``, ...).
        epochs: number of epochs (>= 1), default 200.
        lr: initial (global) learning rate (> 0), default 0.1.
        batch_size: training batch size per process, default 128 (evaluation uses ``eval_batch_size``);
            under torchrun the global batch is ``batch_size * WORLD_SIZE`` (logged in ``config.json``).
        weight_decay: L2 weight decay (>= 0), default 5e-4.
        momentum: SGD momentum, default 0.9 (LARS ignores it: the paper's LARS has none).
        seed: seed of the weights, the batch order and the augmentation, default 43.
        out: run directory (config.json, metrics, checkpoints, summary.json); None = no files.
        data_dir: where the data set lives on disk (None = the data layer's default).
        download: let the data layer fetch a missing data set into ``data_dir``, default False.
        device: ``"auto"`` (cuda when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        train_fraction: fraction of the training set used, in (0, 1], default 1.
        width: model width factor, default 1.
        s1, s2: TempBalance's lowest / highest learning-rate factor, default 0.5 / 1.5.
        assign: TempBalance assignment function, default ``"linear"``.
        metric: quantity TempBalance balances on, one of ``METRICS``, default ``"alpha"``.
        fit: power-law fit, one of ``FITS``, default ``"median"``.
        esd: TempBalance's spectrum, ``"full"`` (default, the published rule) or ``"farms"`` (pooled over
            fixed-aspect-ratio windows, ``TempBalance(esd="farms")``; docs/farms.md).
        asynchronous: TempBalance measures a snapshot of the weights on a worker thread and applies the
            factors when ready (``TempBalance(asynchronous=True)``), default False; single process only.
            An epoch's logged ``alpha`` is then that of the last measurement applied by its end.
            (Called ``tb_async`` before 0.2; that name is still read.)
        wd_s1: AlphaDecay's lowest weight-decay factor (``alphadecay`` methods), default 0.5.
        wd_s2: AlphaDecay's highest weight-decay factor (``alphadecay`` methods), default 1.5.
        normalize: ``"mean"`` divides the balancing factors by their mean (average factor 1), default ``"none"``.
        norm_follows: which layer a norm layer follows for balancing: ``"order"`` (default), ``"name"`` (the
            reference's ``bn`` -> ``conv`` rule, used by ``configs/paper``) or ``"none"``.
        snr_coef: spectral-norm regularisation coefficient for the ``snr`` methods, default 0.01.
        snr_power_iterations: power iterations per step for SNR, default 1.
        sgdr_t0: restart period (epochs) of ``sgdr``, default 100 (``T_mult = 1``).
        lars_trust: LARS trust coefficient, default 1e-3.
        lookahead_k, lookahead_alpha: Lookahead's sync period and step, default 10 / 0.8.
        augment: random crop + flip (images) as the data layer defines it, default True.
        amp: ``"auto"`` (bf16 autocast on CUDA only), ``"bf16"`` or ``"off"``.
        compile: wrap the model in ``torch.compile``, default False.
        sync_bn: under torchrun, convert BatchNorm to ``SyncBatchNorm`` (statistics over the global
            batch; CUDA only), default False: each rank normalises with its own batch, as DDP does.
        deterministic: ``torch.use_deterministic_algorithms`` during the run, default True.
        num_threads: torch CPU threads for the run (None = leave as is).
        eval_batch_size: batch size for the test set, default 512.
        progress: show progress on stderr, default True: a tqdm bar on a terminal, else one log line per epoch.
        resume: continue the run in ``out`` from its checkpoint, default False; a finished run is
            left as it is. Settings not given are read back from the run.
        overwrite: delete the run in ``out`` (its config, metrics, summary, checkpoints) and start
            over, default False.
        stop_after: stop (resumably) after this many epochs in total, e.g. to time-slice a job;
            None = run to ``epochs``.
        tag: free label; the report groups runs by it (a sweep sets it to the setting's name).
    """

    dataset: str = "cifar10"
    model: str = ""
    method: str = "cal"
    epochs: int = 200
    lr: float = 0.1
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 43
    out: str | None = None
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    train_fraction: float = 1.0
    width: float = 1.0
    s1: float = 0.5
    s2: float = 1.5
    assign: str = "linear"
    metric: str = "alpha"
    fit: str = "median"
    esd: str = "full"
    asynchronous: bool = field(default=False, metadata={"flags": ("--asynchronous", "--tb-async")})
    wd_s1: float = 0.5
    wd_s2: float = 1.5
    normalize: str = "none"
    norm_follows: str = "order"
    snr_coef: float = 0.01
    snr_power_iterations: int = 1
    sgdr_t0: int = 100
    lars_trust: float = 1e-3
    lookahead_k: int = 10
    lookahead_alpha: float = 0.8
    augment: bool = True
    amp: str = "auto"
    compile: bool = False
    sync_bn: bool = False
    deterministic: bool = True
    num_threads: int | None = field(default=None, metadata={"flags": ("--threads", "--num-threads")})
    eval_batch_size: int = 512
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    tag: str = ""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of all settable fields."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> its one-paragraph description from the class docstring (markup removed);
        a field the docstring does not describe maps to ``""``."""
        described = _attribute_docs(cls.__doc__ or "")
        return {name: described.get(name, "") for name in cls.field_names()}

    @staticmethod
    def upgrade_dict(values: dict[str, Any]) -> dict[str, Any]:
        """``values`` with old field names (:data:`RENAMED_FIELDS`) under their new names."""
        out = dict(values)
        for old, new in RENAMED_FIELDS.items():
            if old in out:
                if new in out and out[new] != out[old]:
                    raise ConfigError(f"{old}={out[old]!r} (the old name of {new}) contradicts {new}={out[new]!r}")
                out[new] = out.pop(old)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping (old field names accepted); an unknown key is an error that lists
        the accepted ones."""
        values = cls.upgrade_dict(values)
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown training setting(s) {unknown}; accepted: {', '.join(cls.field_names())}")
        return cls(**values)

    @classmethod
    def for_resume(cls, out: str | os.PathLike, given: dict[str, Any]) -> "TrainConfig":
        """The config that continues the run in ``out``: the settings it records (its checkpoint's,
        else its ``config.json``) with ``given`` on top, ``resume=True``. Fields in
        :data:`NOT_READ_BACK` (``stop_after``, ``progress``, ...) are not read back. A directory
        holding no run gives just ``given``.

        Raises:
            ConfigError: an unknown key in ``given``.
        """
        from .rundir import recorded_settings

        recorded = cls.upgrade_dict(recorded_settings(out) or {})
        known = set(cls.field_names()) - NOT_READ_BACK
        values = {key: value for key, value in recorded.items() if key in known}
        return cls.from_dict({**values, **given, "out": os.fspath(out), "resume": True})

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain values (what ``config.json`` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def experiment_settings(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The fields that define the experiment (every field outside
        :data:`RESULT_NEUTRAL_FIELDS`), in field order, read from a run's recorded ``values``: old
        field names are read under their new ones, and a field ``values`` lacks had its default
        when the run was saved."""
        defaults = cls().to_dict()
        values = cls.upgrade_dict(values)
        return {name: values.get(name, defaults[name]) for name in cls.field_names() if name not in RESULT_NEUTRAL_FIELDS}

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """``"name: recorded -> now"`` for each field of :meth:`experiment_settings` that differs
        between a run's ``recorded`` settings and these."""
        current = self.to_dict()
        return [
            f"{name}: {value!r} -> {current[name]!r}"
            for name, value in self.experiment_settings(recorded).items()
            if value != current[name]
        ]

    def validate(self) -> "TrainConfig":
        """Check every value; fill in the data set's default model. Returns ``self``.

        Raises:
            ConfigError: naming the bad value and what is accepted (also for a ``data_dir`` that
                does not exist, unless ``download``).
        """
        from . import data, methods, models

        self.out = None if self.out is None else os.fspath(self.out)
        self.data_dir = None if self.data_dir is None else os.fspath(self.data_dir)
        for name in _fields_typed("bool"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        for name in _fields_typed("str", "str | None"):
            value = getattr(self, name)
            if not (isinstance(value, str) or (value is None and "None" in _field_type(name))):
                raise ConfigError(f"{name}={value!r} must be a string")
        datasets = data.DATASETS
        if self.dataset not in datasets:
            raise ConfigError(f"unknown dataset {self.dataset!r}; accepted: {', '.join(sorted(datasets))}")
        if not self.model:
            self.model = datasets[self.dataset].default_model
        if self.model not in models.MODEL_NAMES:
            raise ConfigError(f"unknown model {self.model!r}; accepted: {', '.join(models.MODEL_NAMES)}")
        if self.method not in methods.METHODS:
            raise ConfigError(f"unknown method {self.method!r}; accepted: {', '.join(methods.METHODS)}")
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("eval_batch_size", self.eval_batch_size)
        _positive_int("snr_power_iterations", self.snr_power_iterations)
        _positive_int("sgdr_t0", self.sgdr_t0)
        _positive_int("lookahead_k", self.lookahead_k)
        _finite("lr", self.lr, low=0.0, low_open=True)
        _finite("weight_decay", self.weight_decay, low=0.0)
        _finite("momentum", self.momentum, low=0.0)
        _finite("width", self.width, low=0.0, low_open=True)
        _finite("s1", self.s1, low=0.0, low_open=True)
        _finite("s2", self.s2, low=0.0)
        _finite("wd_s1", self.wd_s1, low=0.0, low_open=True)
        _finite("wd_s2", self.wd_s2, low=0.0)
        _finite("snr_coef", self.snr_coef, low=0.0)
        _finite("lars_trust", self.lars_trust, low=0.0, low_open=True)
        _finite("lookahead_alpha", self.lookahead_alpha, low=0.0, low_open=True)
        if self.s1 > self.s2:
            raise ConfigError(f"s1={self.s1} > s2={self.s2}; need s1 <= s2 (lowest and highest lr factor)")
        if self.wd_s1 > self.wd_s2:
            raise ConfigError(
                f"wd_s1={self.wd_s1} > wd_s2={self.wd_s2}; need wd_s1 <= wd_s2 (lowest and highest weight-decay factor)"
            )
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"unknown normalize {self.normalize!r}; accepted: {', '.join(NORMALIZE)}")
        if self.norm_follows not in NORM_FOLLOWS:
            raise ConfigError(f"unknown norm_follows {self.norm_follows!r}; accepted: {', '.join(NORM_FOLLOWS)}")
        _finite("train_fraction", self.train_fraction, low=0.0, low_open=True)
        if self.train_fraction > 1:
            raise ConfigError(f"train_fraction={self.train_fraction} must be in (0, 1]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an integer")
        from ..assign import create_assign

        create_assign(self.assign)  # raises naming the value and the accepted names
        if self.fit not in FITS:
            raise ConfigError(f"unknown fit {self.fit!r}; accepted: {', '.join(FITS)}")
        if self.esd not in ESD_MODES:
            raise ConfigError(f"unknown esd {self.esd!r}; accepted: {', '.join(ESD_MODES)}")
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; accepted: {', '.join(METRICS)}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"unknown amp {self.amp!r}; accepted: {', '.join(AMP_MODES)}")
        if not (self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps", "xpu")):
            raise ConfigError(f"unknown device {self.device!r}; accepted: auto, cpu, cuda, cuda:N, mps, xpu")
        if self.num_threads is not None:
            _positive_int("num_threads", self.num_threads)
        if self.stop_after is not None:
            _positive_int("stop_after", self.stop_after)
        if self.data_dir is not None and not self.download and not os.path.isdir(self.data_dir):
            raise ConfigError(
                f"data_dir {self.data_dir!r} does not exist or is not a directory "
                f"(with {spell('download')} it is created and the data set fetched into it)"
            )
        if self.resume and self.out is None:
            raise ConfigError(
                f"{spell('resume')} needs an output directory ({spell('out', Placeholder('DIR'))}) holding the run"
            )
        if self.resume and self.overwrite:
            raise ConfigError(f"{spell('resume')} and {spell('overwrite')} contradict each other; pass one of them")
        if self.overwrite and self.out is None:
            raise ConfigError(f"{spell('overwrite')} needs an output directory ({spell('out', Placeholder('DIR'))})")
        return self


def parse_value(text: str) -> Any:
    """A setting's value from text, read as TOML (numbers, booleans, ``[lists]``, ``"strings"``),
    falling back to the raw text (so ``cpu`` is the string ``"cpu"``)."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def _field_type(name: str) -> str:
    """The annotation of field ``name`` as written (``"int | None"``)."""
    (declared,) = [f.type for f in dataclasses.fields(TrainConfig) if f.name == name]
    return declared if isinstance(declared, str) else getattr(declared, "__name__", str(declared))


def _fields_typed(*annotations: str) -> list[str]:
    """The fields declared with one of ``annotations`` (as written, e.g. ``"bool"``)."""
    return [f.name for f in dataclasses.fields(TrainConfig) if _field_type(f.name) in annotations]


_MARKUP = re.compile(r"``([^`]*)``|:\w+:`~?([^`]*)`")


def _attribute_docs(doc: str) -> dict[str, str]:
    """Parse a Google-style ``Attributes:`` section: ``name: text`` or ``a, b: text`` entries,
    continuation lines indented deeper. Returns name -> text with the reST markup removed."""
    lines = doc.expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    entries: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        head, sep, text = line.strip().partition(": ")
        if depth == indent and sep and re.fullmatch(r"\w+(, \w+)*", head):
            names = head.split(", ")
            for name in names:
                entries[name] = text.strip()
        elif names:
            for name in names:
                entries[name] += " " + line.strip()
    return {name: _MARKUP.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
            for name, text in entries.items()}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1")


def _finite(name: str, value: Any, low: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > low if low_open else value >= low
    if not ok:
        relation = ">" if low_open else ">="
        raise ConfigError(f"{name}={value!r} must be a finite number {relation} {low:g}")
