"""What ``import tempbalance`` gives: the public names users need and the version."""

from __future__ import annotations


def test_the_public_api_names_what_users_need():
    from importlib.metadata import version

    import tempbalance

    assert tempbalance.__version__ == version("tempbalance")
    assert issubclass(tempbalance.ConfigError, tempbalance.TempBalanceError)
    assert issubclass(tempbalance.ConfigError, ValueError)
    for name in ("ConfigError", "TempBalanceError", "Rebalance", "LayerBalance", "model_balancing"):
        assert name in tempbalance.__all__ and getattr(tempbalance, name) is not None
