"""Model zoo: every registered model builds, runs and has the published size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tempbalance.errors import ConfigError
from tempbalance.train.models import MODEL_NAMES, create_model

INPUTS = {
    "cnn1d": (1, (2, 1, 40)),
    "cnn1d-deep": (1, (2, 1, 40)),
    "cnn-digits": (1, (2, 1, 8, 8)),
    "mlp": (1, (2, 40)),
    "resnet18-64": (3, (2, 3, 64, 64)),
    "resnet34-64": (3, (2, 3, 64, 64)),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_gives_logits(name):
    channels, shape = INPUTS.get(name, (3, (2, 3, 32, 32)))
    torch.manual_seed(0)
    model = create_model(name, 7, in_channels=channels, width=0.25).eval()
    with torch.no_grad():
        out = model(torch.randn(*shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


# Parameter counts of the standard CIFAR-10 variants, counted by hand from the layer shapes:
# ResNet18 (kuangliu layout) 11,173,962; WRN-16-8 has 10.96 M, WRN-28-10 would have 36.5 M.
def test_resnet18_has_the_standard_cifar_size():
    model = create_model("resnet18", 10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def test_conv_and_linear_layer_counts():
    def count(model):
        return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())

    # ResNet18: 17 3x3 convs + 3 shortcut convs + 1 linear; ResNet34: 33 + 3 + 1; VGG16: 13 + 1; VGG19: 16 + 1
    assert count(create_model("resnet18", 10)) == 21
    assert count(create_model("resnet34", 10)) == 37
    assert count(create_model("vgg16", 10)) == 14
    assert count(create_model("vgg19", 10)) == 17
    # WRN-d-k: 1 stem + 2 per block (n = (d-4)/6 blocks per stage, 3 stages) + 3 projections + 1 linear
    assert count(create_model("wrn16-8", 10)) == 1 + 2 * 6 + 3 + 1
    assert count(create_model("wrn28-6", 10)) == 1 + 2 * 12 + 3 + 1
    # the deeper mnist1d CNN: 1 stem conv + 3 stages x 3 convs + 1 linear (the plain cnn1d has 4 convs)
    assert sum(isinstance(m, (nn.Conv1d, nn.Linear)) for m in create_model("cnn1d-deep", 10, 1).modules()) == 11


def test_width_scales_channels():
    narrow = create_model("resnet18", 10, width=0.5)
    assert narrow.conv1.out_channels == 32 and narrow.linear.in_features == 256


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(name="resnet19", num_classes=10), "resnet18"),
        (dict(name="resnet18", num_classes=0), "num_classes=0"),
        (dict(name="resnet18", num_classes=10, width=0), "width=0"),
    ],
)
def test_bad_model_arguments_name_the_value(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        create_model(**kwargs)
