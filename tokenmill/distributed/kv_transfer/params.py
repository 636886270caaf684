"""vLLM's `kv_transfer_params` (NixlConnector's HTTP protocol), read and written.

A router sends the prefill instance {"do_remote_decode": true, "do_remote_prefill": false, ...nulls};
the prefill instance answers with {"do_remote_prefill": true, "do_remote_decode": false,
"remote_engine_id", "remote_request_id", "remote_block_ids", "remote_host", "remote_port",
"tp_size": 1}, which the router hands, unchanged, to the decode instance.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemotePrefill:
    """Where a decode instance pulls a request's prompt KV from."""
    engine_id: str
    request_id: str
    block_ids: list[int]
    host: str
    port: int


def parse_kv_transfer_params(params) -> tuple[bool, RemotePrefill | None]:
    """(do_remote_decode, the remote prefill to pull or None). Raises ValueError, naming the field,
    when the params ask for a remote prefill but do not say where from."""
    if params is None:
        return False, None
    if not isinstance(params, dict):
        raise ValueError(f"kv_transfer_params must be an object, got {type(params).__name__}")
    if params.get("do_remote_decode") is True:
        return True, None
    if params.get("do_remote_prefill") is not True:
        return False, None
    blocks = params.get("remote_block_ids")
    if not isinstance(blocks, list) or not blocks or \
            not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
        raise ValueError("kv_transfer_params.remote_block_ids must be a non-empty list of block ids")
    port = params.get("remote_port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"kv_transfer_params.remote_port must be a TCP port, got {port!r}")
    for name in ("remote_host", "remote_request_id"):
        if not isinstance(params.get(name), str) or not params[name]:
            raise ValueError(f"kv_transfer_params.{name} must be a non-empty string")
    if params.get("tp_size", 1) not in (1, None):
        raise ValueError(f"kv_transfer_params.tp_size must be 1 (the producer is not tensor parallel), "
                         f"got {params['tp_size']!r}")
    return False, RemotePrefill(str(params.get("remote_engine_id") or ""), params["remote_request_id"],
                                list(blocks), params["remote_host"], port)


def producer_params(engine_id: str, request_id: str, block_ids: list[int], host: str, port: int) -> dict:
    """What a prefill instance answers, for the decode instance to pull the blocks."""
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": engine_id,
            "remote_request_id": request_id, "remote_block_ids": list(block_ids), "remote_host": host,
            "remote_port": port, "tp_size": 1}
