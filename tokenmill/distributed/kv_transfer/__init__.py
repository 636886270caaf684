"""KV transfer between a prefill instance (producer) and a decode instance (consumer).

The HTTP side speaks vLLM's NixlConnector protocol (`kv_transfer_params`, see params.py), so vLLM's
proxies and vllm-router drive tokenmill unchanged. The bytes move through a KVConnector (base.py):
the producer keeps a finished prompt's blocks under a lease and serves them, the consumer pulls the
blocks it lacks into blocks of its own. One transport is built in, TCP (tcp.py).
"""
from tokenmill.distributed.kv_transfer.base import KVConnector, KVLoad, KVTransferError, KVTransferStats
from tokenmill.distributed.kv_transfer.params import RemotePrefill, parse_kv_transfer_params

__all__ = ["KVConnector", "KVLoad", "KVTransferError", "KVTransferStats", "RemotePrefill",
           "parse_kv_transfer_params", "make_kv_connector"]


def make_kv_connector(config, kv_caches) -> KVConnector | None:
    """The connector config.kv_role asks for (None when the engine takes no part in KV transfer)."""
    if config.kv_role is None:
        return None
    from tokenmill.distributed.kv_transfer.tcp import TCPKVConnector

    return TCPKVConnector(config, kv_caches)
