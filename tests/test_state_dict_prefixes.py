"""strip_wrapper_prefixes: the state dict of a DDP- or torch.compile-wrapped model loads into the bare
model, its ``_metadata`` (module versions) renamed with the keys, the caller's dict left as it was."""

from __future__ import annotations

import torch
from torch import nn

from tempbalance.checkpoint_files import strip_wrapper_prefixes


class Wrapper(nn.Module):
    """Stands in for DDP (``module``) or torch.compile (``_orig_mod``): the same key prefixes."""

    def __init__(self, attribute: str, inner: nn.Module):
        super().__init__()
        setattr(self, attribute, inner)


def bare() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))


def test_a_wrapped_state_dict_loads_into_the_bare_model():
    torch.manual_seed(0)
    inner = bare()
    state = Wrapper("module", Wrapper("_orig_mod", inner)).state_dict()
    keys_before = list(state)
    stripped = strip_wrapper_prefixes(state)
    assert list(stripped) == list(inner.state_dict())  # every key, in module order
    assert list(state) == keys_before  # the caller's dict is untouched
    assert set(stripped._metadata) == set(inner.state_dict()._metadata)
    assert stripped._metadata["1"]["version"] == inner.state_dict()._metadata["1"]["version"]
    target = bare()
    target.load_state_dict(stripped, strict=True)
    for name, tensor in inner.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)


def test_a_plain_mapping_without_metadata_keeps_its_order():
    state = {"head.weight": 1, "module.body.weight": 2, "_orig_mod.module.tail.weight": 3, "modulex": 4}
    stripped = strip_wrapper_prefixes(state)
    assert list(stripped.items()) == [("head.weight", 1), ("body.weight", 2), ("tail.weight", 3), ("modulex", 4)]
    assert not hasattr(stripped, "_metadata")
