"""The KV connector interface: what the engine asks of a KV transport, and what every transport shares.

    producer (prefill instance)                 consumer (decode instance)
    ---------------------------                 --------------------------
    request finishes after one token
    add_lease(id, blocks) -> kv_transfer_params  -- HTTP, through the router -->
                                                 scheduler allocates blocks, start_load(KVLoad)
    serves the leased blocks  <---- transport (TCP: tcp.py) ---->  writes them into its blocks
    read confirmed: lease released               load done: take_events() -> the request resumes

Scheduler side (engine thread, pure Python): add_lease / expire_lease / take_events / stats. Worker
side (tensors, transport threads): start_load, and the transport's serving of leased blocks, which
read and write the paged cache tensors directly (read_blocks / write_blocks).

A producer's blocks stay allocated while leased; the lease ends when the consumer confirms its read,
when it expires (config.kv_lease_timeout s without a read), or when the request is aborted. The
scheduler frees the blocks of every lease take_events() reports released; a lease being read is never
released under its reader.

A transport is one subclass: `_load(load, deadline)` (pull the blocks, raise KVTransferError) plus
serving `begin_read` / `end_read` leases to its peers; shared memory or RDMA would be another.
"""
from __future__ import annotations

import threading
import time
import uuid
from abc import ABC, abstractmethod
from bisect import bisect_left
from dataclasses import dataclass, field

import torch

from tokenmill.distributed.kv_transfer.params import RemotePrefill, producer_params

TRANSFER_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class KVTransferError(RuntimeError):
    """A transfer failed: peer unreachable, timeout, refused, malformed or corrupted data."""


@dataclass(frozen=True)
class KVLoad:
    """Pull remote blocks src_block_ids (of remote.request_id) into local dst_block_ids, in order."""
    request_id: str
    remote: RemotePrefill
    src_block_ids: list[int]
    dst_block_ids: list[int]


@dataclass(frozen=True)
class KVTransferStats:
    """Counters since start (never reset) and the current number of leases."""
    blocks_sent: int = 0
    blocks_received: int = 0
    bytes: int = 0  # sent plus received
    leases_expired: int = 0
    load_failures: int = 0
    num_leases: int = 0
    # kv_transfer_seconds: cumulative counts per bucket of TRANSFER_SECONDS_BUCKETS (+Inf last)
    seconds_buckets: tuple[int, ...] = (0,) * (len(TRANSFER_SECONDS_BUCKETS) + 1)
    seconds_sum: float = 0.0


@dataclass
class KVEvents:
    """What happened since the last take_events(): leases to free, loads finished (error or None)."""
    released: list[str] = field(default_factory=list)
    loaded: list[tuple[str, str | None]] = field(default_factory=list)


@dataclass
class _Lease:
    block_ids: list[int]
    expires: float
    readers: int = 0
    done: bool = False  # confirmed read or aborted: release once no reader is left


class KVConnector(ABC):
    def __init__(self, config, kv_caches: list[torch.Tensor]) -> None:
        self.role = config.kv_role
        self.lease_timeout = config.kv_lease_timeout
        self.load_timeout = config.kv_load_timeout
        self.engine_id = uuid.uuid4().hex
        self.kv_caches = kv_caches
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._loaded: list[tuple[str, str | None]] = []
        self._counts = dict(blocks_sent=0, blocks_received=0, bytes=0, leases_expired=0, load_failures=0)
        self._seconds = [0] * (len(TRANSFER_SECONDS_BUCKETS) + 1)
        self._seconds_sum = 0.0

    @property
    def is_producer(self) -> bool:
        return self.role in ("producer", "both")

    @property
    def is_consumer(self) -> bool:
        return self.role in ("consumer", "both")

    @property
    @abstractmethod
    def address(self) -> tuple[str, int]:
        """(host, port) consumers reach this producer at."""

    # ---- scheduler side (engine thread) --------------------------------------------------------

    def add_lease(self, request_id: str, block_ids: list[int]) -> dict:
        """Keep a finished prompt's blocks for a consumer; returns the kv_transfer_params to answer."""
        with self._lock:
            self._leases[request_id] = _Lease(list(block_ids), time.monotonic() + self.lease_timeout)
        host, port = self.address
        return producer_params(self.engine_id, request_id, block_ids, host, port)

    def expire_lease(self, request_id: str) -> bool:
        """End a lease now (its request was aborted); False if there is none."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                return False
            lease.done = True
            return True

    def has_leases(self) -> bool:
        return bool(self._leases)

    def take_events(self) -> KVEvents:
        now = time.monotonic()
        events = KVEvents()
        with self._lock:
            for rid, lease in list(self._leases.items()):
                if lease.readers:
                    continue
                if not lease.done and now >= lease.expires:
                    self._counts["leases_expired"] += 1
                    lease.done = True
                if lease.done:
                    del self._leases[rid]
                    events.released.append(rid)
            events.loaded, self._loaded = self._loaded, []
        return events

    def stats(self) -> KVTransferStats:
        with self._lock:
            cumulative, total = [], 0
            for n in self._seconds:
                total += n
                cumulative.append(total)
            return KVTransferStats(**self._counts, num_leases=len(self._leases),
                                   seconds_buckets=tuple(cumulative), seconds_sum=self._seconds_sum)

    # ---- serving leases (transport threads) ------------------------------------------------------

    def begin_read(self, request_id: str, block_ids: list[int]) -> None:
        """A consumer starts reading blocks of a lease; raises KVTransferError if it may not."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None or lease.done:
                raise KVTransferError(f"no KV lease for request {request_id!r} (expired, read or aborted)")
            if not set(block_ids) <= set(lease.block_ids):
                raise KVTransferError(f"blocks {sorted(set(block_ids) - set(lease.block_ids))} are not leased "
                                      f"to request {request_id!r}")
            lease.readers += 1

    def end_read(self, request_id: str, confirmed: bool, num_blocks: int = 0, nbytes: int = 0) -> None:
        """The read ended; confirmed: the consumer has the blocks (the lease is released)."""
        with self._lock:
            lease = self._leases[request_id]
            lease.readers -= 1
            if confirmed:
                lease.done = True
                self._counts["blocks_sent"] += num_blocks
                self._counts["bytes"] += nbytes

    # ---- loading (consumer) --------------------------------------------------------------------

    def start_load(self, load: KVLoad) -> None:
        """Pull the blocks on a thread of its own; the outcome comes back through take_events(). A load
        of no blocks only tells the producer to end its lease (nothing comes back)."""
        target = self._run_load if load.dst_block_ids else self._release_remote
        threading.Thread(target=target, args=(load,), name="tokenmill-kv-load", daemon=True).start()

    def _release_remote(self, load: KVLoad) -> None:
        try:
            self._load(load, time.monotonic() + self.load_timeout)
        except Exception:  # the producer is gone or the lease ended already: it frees at expiry
            pass

    def _run_load(self, load: KVLoad) -> None:
        start = time.monotonic()
        error = None
        try:
            nbytes = self._load(load, start + self.load_timeout)
        except KVTransferError as e:
            error = str(e)
        except Exception as e:  # a bug or an OS error: fail the load, never the engine
            error = f"{type(e).__name__}: {e}"
        elapsed = time.monotonic() - start
        with self._lock:
            if error is None:
                self._counts["blocks_received"] += len(load.dst_block_ids)
                self._counts["bytes"] += nbytes
                self._seconds[bisect_left(TRANSFER_SECONDS_BUCKETS, elapsed)] += 1
                self._seconds_sum += elapsed
            else:
                self._counts["load_failures"] += 1
            self._loaded.append((load.request_id, error))

    @abstractmethod
    def _load(self, load: KVLoad, deadline: float) -> int:
        """Pull load.src_block_ids from load.remote into load.dst_block_ids before `deadline`
        (time.monotonic()); returns the bytes received. Raises KVTransferError."""

    def close(self) -> None:
        """Stop serving (a transport with a listener overrides this)."""

    # ---- the paged cache (worker side) ------------------------------------------------------------

    def block_layout(self) -> tuple[str, list[int], int]:
        """(dtype name, shape of one block in one layer, number of layers): what both ends must share."""
        cache = self.kv_caches[0]
        shape = [cache.shape[0], *cache.shape[2:]]
        return str(cache.dtype).removeprefix("torch."), shape, len(self.kv_caches)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """The blocks' keys and values, layer by layer, as one contiguous byte tensor."""
        idx = torch.tensor(block_ids, dtype=torch.long)
        data = torch.stack([cache.index_select(1, idx) for cache in self.kv_caches])
        return data.view(torch.uint8).reshape(-1)

    def write_blocks(self, block_ids: list[int], payload: torch.Tensor) -> None:
        """Write bytes laid out as read_blocks makes them into the given blocks."""
        cache = self.kv_caches[0]
        data = payload.view(cache.dtype).view(len(self.kv_caches), cache.shape[0], len(block_ids), *cache.shape[2:])
        idx = torch.tensor(block_ids, dtype=torch.long)
        for layer, dst in enumerate(self.kv_caches):
            dst.index_copy_(1, idx, data[layer])
