"""The ``vllm.general_plugins`` entry point of kvtier (pyproject.toml).

vLLM loads general plugins in every process it starts (the engine core, spawned workers), early:
this module imports nothing of vLLM's connector machinery, it only tells the factory where
``KvtierConnector`` lives, so that ``kv_connector="KvtierConnector"`` resolves by name.
"""

from __future__ import annotations

CONNECTOR_NAME = "KvtierConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in getattr(KVConnectorFactory, "_registry", {}):
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "kvtier.integrations.vllm", "KvtierConnector")
