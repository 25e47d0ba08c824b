"""Model zoo of the experiment harness: CIFAR ResNets, VGGs, WideResNets and small models
for the embedded data sets, created by name through one registry."""

from . import resnet, small, vgg, wide_resnet  # noqa: F401  (each registers its models)
from .registry import create_model, register_model, registered_names

MODEL_NAMES: tuple[str, ...] = registered_names()

__all__ = ["MODEL_NAMES", "create_model", "register_model"]
