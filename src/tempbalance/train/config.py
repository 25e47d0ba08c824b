"""The settings of one training run (:class:`TrainConfig`) and their validation.

Every field is a plain value so a config round-trips through ``config.json`` and sweep files.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["TrainConfig", "RESULT_NEUTRAL_FIELDS", "FITS", "METRICS", "RENAMED_FIELDS"]

FITS = ("median", "ks", "fix-finger")
METRICS = ("alpha", "alphahat", "spectral_norm")
AMP_MODES = ("auto", "bf16", "off")
NORMALIZE = ("none", "mean")
NORM_FOLLOWS = ("order", "name", "none")

# Old field names still read from config.json, checkpoints and sweep files: old -> new.
RENAMED_FIELDS = {"tb_async": "asynchronous"}

# Fields that may differ between a run and its resumption without changing its results.
RESULT_NEUTRAL_FIELDS = frozenset(
    {"out", "data_dir", "download", "resume", "progress", "stop_after", "compile", "device", "num_threads", "tag"}
)


@dataclass
class TrainConfig:
    """One training run. Defaults are the paper's CIFAR setup (method.md §3).

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
        asynchronous: TempBalance measures a snapshot of the weights on a worker thread and applies the
            factors when ready (``TempBalance(asynchronous=True)``), default False; single process only.
            An epoch's logged ``alpha`` is then that of the last measurement applied by its end.
            (Called ``tb_async`` before 0.2; that name is still read.)
        wd_s1, wd_s2: AlphaDecay's lowest / highest weight-decay factor (``alphadecay`` methods), default 0.5 / 1.5.
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
        progress: show a tqdm bar on stderr, default True.
        resume: continue from ``out/checkpoint.pt`` when it exists, default False.
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
    asynchronous: bool = False
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
    num_threads: int | None = None
    eval_batch_size: int = 512
    progress: bool = True
    resume: bool = False
    stop_after: int | None = None
    tag: str = ""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of all settable fields."""
        return tuple(f.name for f in dataclasses.fields(cls))

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

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain values (what ``config.json`` holds)."""
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Check every value; fill in the data set's default model. Returns ``self``.

        Raises:
            ConfigError: naming the bad value and what is accepted.
            FileNotFoundError: ``data_dir`` given but missing.
        """
        from . import data, methods, models

        self.out = None if self.out is None else os.fspath(self.out)
        self.data_dir = None if self.data_dir is None else os.fspath(self.data_dir)
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
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise FileNotFoundError(f"data_dir {self.data_dir!r} does not exist or is not a directory")
        for name in ("sync_bn", "asynchronous"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.resume and self.out is None:
            raise ConfigError("resume=True needs an output directory (out) holding checkpoint.pt")
        return self


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
