"""Adapters that run :class:`tempbalance.TempBalance` inside training frameworks.

Each submodule imports its framework when it is imported itself, never before:
``tempbalance.integrations.lightning`` (a Lightning ``Callback``),
``tempbalance.integrations.transformers`` (optimizer and scheduler for ``transformers.Trainer``)
and ``tempbalance.integrations.accelerate`` (a balancer registered for accelerate checkpoints).
Install the extras with ``pip install 'tempbalance[lightning]'`` or ``'tempbalance[transformers]'``.
"""

__all__: list[str] = []
