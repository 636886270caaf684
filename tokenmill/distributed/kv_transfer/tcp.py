"""KV transfer over TCP: the producer listens on --kv-port; a consumer connects per request and pulls.

    consumer -> producer   frame {"op": "read", "request_id", "block_ids"}
    producer -> consumer   frame {"status": "ok", "dtype", "block_shape", "num_layers", "num_blocks",
                                  "nbytes", "crc32"}, then nbytes raw bytes
                           (or frame {"status": "error", "message"})
    consumer -> producer   frame {"op": "done", "ok": bool}: the producer releases the lease

A frame is a 4-byte big-endian length and that many bytes of JSON (no pickle: a peer can send only
data). The raw bytes are the blocks' keys and values straight from the paged cache tensors, layer by
layer (KVConnector.read_blocks); the consumer checks layout and CRC-32 before writing a byte of them
into its own blocks, and refuses the transfer on any mismatch.
"""
from __future__ import annotations

import json
import logging
import socket
import socketserver
import struct
import threading
import time
import zlib

import torch

from tokenmill.distributed.kv_transfer.base import KVConnector, KVLoad, KVTransferError

logger = logging.getLogger("tokenmill.kv_transfer")

_MAX_FRAME = 1 << 20
_LEN = struct.Struct("!I")


def send_frame(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_exact(sock: socket.socket, buf: memoryview, deadline: float | None = None) -> None:
    """Fill buf from sock; raises KVTransferError if the peer closes first or the deadline passes."""
    got = 0
    while got < len(buf):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KVTransferError("the KV transfer timed out")
            sock.settimeout(left)
        # MSG_WAITALL: the kernel fills the buffer (or times out) without a return to Python, and a
        # return to the GIL, per packet; a loop over the engine's busy GIL would crawl.
        n = sock.recv_into(buf[got:], 0, socket.MSG_WAITALL)
        if n == 0:
            raise KVTransferError(f"the peer closed the connection after {got} of {len(buf)} bytes")
        got += n


def recv_frame(sock: socket.socket, deadline: float | None = None) -> dict:
    head = bytearray(_LEN.size)
    recv_exact(sock, memoryview(head), deadline)
    (n,) = _LEN.unpack(head)
    if n > _MAX_FRAME:
        raise KVTransferError(f"a frame of {n} bytes is over the {_MAX_FRAME}-byte limit")
    body = bytearray(n)
    recv_exact(sock, memoryview(body), deadline)
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise KVTransferError(f"a frame is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise KVTransferError("a frame is not a JSON object")
    return obj


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        connector: TCPKVConnector = self.server.connector
        sock: socket.socket = self.request
        sock.settimeout(connector.lease_timeout)
        try:
            msg = recv_frame(sock)
            rid, blocks = msg.get("request_id"), msg.get("block_ids")
            if msg.get("op") != "read" or not isinstance(rid, str) or not isinstance(blocks, list) \
                    or not all(isinstance(b, int) for b in blocks):
                raise KVTransferError("expected {'op': 'read', 'request_id': str, 'block_ids': [int]}")
            connector.begin_read(rid, blocks)
        except (KVTransferError, OSError) as e:
            _try_send(sock, {"status": "error", "message": str(e)})
            return
        ok = released = False
        nbytes = 0
        try:
            payload = connector.read_blocks(blocks).numpy()
            nbytes = payload.nbytes
            dtype, shape, layers = connector.block_layout()
            send_frame(sock, {"status": "ok", "dtype": dtype, "block_shape": shape, "num_layers": layers,
                              "num_blocks": len(blocks), "nbytes": nbytes, "crc32": zlib.crc32(payload)})
            sock.sendall(memoryview(payload))
            reply = recv_frame(sock)
            released = reply.get("op") == "done"
            ok = released and reply.get("ok") is True
        except (KVTransferError, OSError) as e:
            logger.warning("KV read of %r by %s failed: %s", rid, self.client_address, e)
        finally:
            connector.end_read(rid, released, len(blocks) if ok else 0, nbytes if ok else 0)


def _try_send(sock: socket.socket, obj: dict) -> None:
    try:
        send_frame(sock, obj)
    except OSError:
        pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class TCPKVConnector(KVConnector):
    def __init__(self, config, kv_caches: list[torch.Tensor]) -> None:
        super().__init__(config, kv_caches)
        self.host = config.kv_host
        self._server: _Server | None = None
        self._port = config.kv_port or 0
        if self.is_producer:
            self._server = _Server((self.host, self._port), _Handler)
            self._server.connector = self
            self._port = self._server.server_address[1]
            threading.Thread(target=self._server.serve_forever, name="tokenmill-kv-server", daemon=True).start()
            logger.info("KV producer serving blocks on %s:%d", self.host, self._port)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self._port

    def _load(self, load: KVLoad, deadline: float) -> int:
        remote = load.remote
        try:
            with socket.create_connection((remote.host, remote.port), timeout=max(0.001, deadline - time.monotonic())) as sock:
                return self._pull(sock, load, deadline)
        except socket.timeout:
            raise KVTransferError(f"the KV transfer from {remote.host}:{remote.port} timed out") from None
        except OSError as e:
            raise KVTransferError(f"cannot pull KV from {remote.host}:{remote.port}: {e}") from None

    def _pull(self, sock: socket.socket, load: KVLoad, deadline: float) -> int:
        send_frame(sock, {"op": "read", "request_id": load.remote.request_id, "block_ids": load.src_block_ids})
        header = recv_frame(sock, deadline)
        if header.get("status") != "ok":
            raise KVTransferError(f"the producer refused the KV read: {header.get('message')}")
        dtype, shape, layers = self.block_layout()
        expected = {"dtype": dtype, "block_shape": shape, "num_layers": layers, "num_blocks": len(load.dst_block_ids)}
        got = {k: header.get(k) for k in expected}
        if got != expected:
            raise KVTransferError(f"the producer's KV layout {got} does not match this engine's {expected}")
        nbytes = self.kv_caches[0][:, :1].nbytes * layers * len(load.dst_block_ids)
        if header.get("nbytes") != nbytes:
            raise KVTransferError(f"the producer announced {header.get('nbytes')} bytes, expected {nbytes}")
        payload = torch.empty(nbytes, dtype=torch.uint8)
        view = payload.numpy()
        recv_exact(sock, memoryview(view), deadline)
        if zlib.crc32(view) != header.get("crc32"):
            _try_send(sock, {"op": "done", "ok": False})
            raise KVTransferError("the KV transfer is corrupted (CRC-32 mismatch); refused")
        self.write_blocks(load.dst_block_ids, payload)
        send_frame(sock, {"op": "done", "ok": True})
        return nbytes

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
