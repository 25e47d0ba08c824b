"""The experiment harness: data, models, methods, training loop, checkpoints, reports.

``run_training(TrainConfig(...))`` trains one run; sweeps, reports and the demo build on it.
"""

from .config import TrainConfig
from .loop import run_training
from .methods import METHODS, MethodParts, build_method, register_method

__all__ = ["METHODS", "MethodParts", "TrainConfig", "build_method", "register_method", "run_training"]
