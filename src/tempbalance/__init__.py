"""TempBalance: layer-wise learning-rate balancing from heavy-tailed weight spectra (HT-SR).

Public API: :func:`analyze` (per-layer spectral metrics), :func:`find_layers`,
:func:`register_layer_type`, :func:`fit_power_law`; :class:`TempBalance` and
:func:`param_groups` (the scheduler), its history records :class:`Rebalance` /
:class:`LayerBalance`, and :func:`model_balancing` (Model Balancing's options);
:class:`SpectralNormRegularizer` (SNR); :func:`distributed_analyze_layers` (the eigen work
split across ranks); :class:`ConfigError` (every bad setting) and :class:`TempBalanceError`.
"""

from importlib.metadata import PackageNotFoundError, version

from .analysis import AnalysisOptions, AnalysisReport, LayerRecord, analyze, analyze_layers
from .layers import LayerRef, MatrixOptions, find_layers, register_layer_type, unwrap_model
from .powerlaw import PowerLawFit, fit_power_law
from .assign import create_assign, register_assign, register_metric
from .groups import LayerSelection, param_groups, plan_balance, register_norm_type
from .scheduler import TempBalance
from .history import LayerBalance, Rebalance
from .transformer_layers import model_balancing
from .errors import ConfigError, TempBalanceError
from .regularize import SpectralNormRegularizer
from .distributed import distributed_analyze_layers

try:
    __version__ = version("tempbalance")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AnalysisOptions",
    "AnalysisReport",
    "LayerRecord",
    "LayerRef",
    "MatrixOptions",
    "PowerLawFit",
    "analyze",
    "analyze_layers",
    "find_layers",
    "fit_power_law",
    "register_layer_type",
    "unwrap_model",
    "TempBalance",
    "Rebalance",
    "LayerBalance",
    "model_balancing",
    "ConfigError",
    "TempBalanceError",
    "param_groups",
    "plan_balance",
    "LayerSelection",
    "create_assign",
    "register_assign",
    "register_metric",
    "register_norm_type",
    "SpectralNormRegularizer",
    "distributed_analyze_layers",
]
