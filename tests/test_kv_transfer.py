"""Prefill/decode disaggregation inside one process: a producer LLMEngine and a consumer LLMEngine
talking over the real TCP KV connector on 127.0.0.1, stepped by hand, so every block can be checked
(check_integrity) at every point. The HTTP protocol and the router are in test_pd.py.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest
from helpers import TokenIds, free_port

from tokenmill import SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.distributed.kv_transfer.params import parse_kv_transfer_params
from tokenmill.distributed.kv_transfer.tcp import recv_frame, send_frame
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.request import RequestStatus

ids = TokenIds(121)
BASE = dict(dtype="float32", max_model_len=512, num_kv_blocks=256, enable_prefix_caching=True)
REMOTE_DECODE = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                 "remote_block_ids": None, "remote_host": None, "remote_port": None}


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    model = str(tiny_llama_dir)
    prod = LLMEngine(EngineConfig(model=model, kv_role="producer", kv_port=free_port(), kv_lease_timeout=2.0, **BASE))
    cons = LLMEngine(EngineConfig(model=model, kv_role="consumer", kv_load_timeout=2.0, **BASE))
    mono = LLMEngine(EngineConfig(model=model, **BASE))
    yield prod, cons, mono
    for e in (prod, cons, mono):
        e.close()


def run(engine: LLMEngine, *others: LLMEngine, timeout: float = 30.0) -> dict:
    """Step engine (and others, so their leases are freed) until it is idle; the final outputs by id."""
    finals, deadline = {}, time.monotonic() + timeout
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine did not finish in time"
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        for other in others:
            other.step()
        engine.check_integrity()
        if not engine.scheduler.running:
            time.sleep(0.002)
    return finals


def prefill(prod: LLMEngine, rid: str, prompt: list[int]) -> dict:
    prod.add_request(rid, {"prompt_token_ids": prompt}, greedy(1), kv_transfer_params=REMOTE_DECODE)
    out = run(prod)[rid]
    params = out.kv_transfer_params
    assert params["do_remote_prefill"] is True and params["remote_request_id"] == rid and params["tp_size"] == 1
    return params


def settle(prod: LLMEngine, timeout: float = 10.0) -> None:
    """Step the producer until its leases are gone (read or expired)."""
    deadline = time.monotonic() + timeout
    while prod.has_pending_kv_work():
        assert time.monotonic() < deadline, "leases were not released"
        prod.step()
        time.sleep(0.01)


def test_decode_continues_from_pulled_kv_token_for_token(engines):
    prod, cons, mono = engines
    # Lengths around the block size (16), one of a single token (nothing to pull), and a repeat:
    # the consumer's prefix cache then holds the full blocks and pulls only the rest.
    prompts = [ids(n) for n in (1, 5, 16, 17, 33, 70)]
    prompts.append(prompts[-1][:60] + ids(4))
    for i, p in enumerate(prompts):
        mono.add_request(f"m{i}", {"prompt_token_ids": p}, greedy(12))
    expected = {rid: out.outputs[0].token_ids for rid, out in run(mono).items()}
    before = cons.stats().kv_transfer
    received = 0
    for i, p in enumerate(prompts):
        params = prefill(prod, f"p{i}", p)
        local = cons.scheduler.kv.find_cached_prefix(_probe(cons, p))  # what the consumer holds already
        cons.add_request(f"d{i}", {"prompt_token_ids": p}, greedy(12), kv_transfer_params=params)
        out = run(cons, prod)[f"d{i}"]
        assert out.outputs[0].token_ids == expected[f"m{i}"], f"prompt {i} ({len(p)} tokens)"
        assert out.num_cached_tokens == len(p) - 1
        received += max(0, -(-(len(p) - 1) // 16) - len(local))
    settle(prod)
    after = cons.stats().kv_transfer
    assert after.blocks_received - before.blocks_received == received
    assert prod.stats().kv_transfer.leases_expired == 0  # every lease was read (or released unread)
    for e in (prod, cons):
        e.check_integrity()
        assert e.num_used_blocks == 0


def _probe(engine: LLMEngine, prompt: list[int]):
    from tokenmill.request import Request

    return Request("probe", prompt, greedy(1))


def test_lease_expires_when_no_consumer_reads(engines):
    prod, _, _ = engines
    expired = prod.stats().kv_transfer.leases_expired
    prefill(prod, "orphan", ids(40))
    assert prod.num_used_blocks == 3  # leased: 40 tokens in blocks of 16
    prod.check_integrity()
    settle(prod)
    assert prod.stats().kv_transfer.leases_expired == expired + 1
    prod.check_integrity()
    assert prod.num_used_blocks == 0


def test_abort_on_producer_ends_the_lease(engines):
    prod, _, _ = engines
    prefill(prod, "gone", ids(20))
    prod.abort_request("gone")
    settle(prod, timeout=1.0)
    assert prod.num_used_blocks == 0


class FakeProducer:
    """A KV port that misbehaves: `bad_crc` sends the right layout with a wrong checksum, `close` dies
    half way through the bytes (a producer killed mid-transfer), `stall` stops sending and waits."""

    def __init__(self, mode: str, layout: tuple[str, list[int], int], block_bytes: int) -> None:
        self.mode, self.layout, self.block_bytes = mode, layout, block_bytes
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.release = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            msg = recv_frame(conn)
            n = len(msg["block_ids"])
            dtype, shape, layers = self.layout
            nbytes = n * self.block_bytes
            send_frame(conn, {"status": "ok", "dtype": dtype, "block_shape": shape, "num_layers": layers,
                              "num_blocks": n, "nbytes": nbytes, "crc32": 12345})
            if self.mode == "bad_crc":
                conn.sendall(bytes(nbytes))
                recv_frame(conn)
            else:
                conn.sendall(bytes(nbytes // 2))
                if self.mode == "stall":
                    self.release.wait(30)

    def params(self, num_blocks: int) -> dict:
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "fake",
                "remote_request_id": "x", "remote_block_ids": list(range(num_blocks)),
                "remote_host": "127.0.0.1", "remote_port": self.port, "tp_size": 1}

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@pytest.mark.parametrize("mode", ["bad_crc", "close", "stall"])
def test_failed_pull_recomputes_the_prompt(engines, mode):
    _, cons, mono = engines
    prompt = ids(50)
    mono.add_request("ref", {"prompt_token_ids": prompt}, greedy(8))
    expected = run(mono)["ref"].outputs[0].token_ids
    layout = cons.kv_connector.block_layout()
    fake = FakeProducer(mode, layout, cons.kv_connector.read_blocks([0]).numel())
    failures = cons.stats().kv_transfer.load_failures
    try:
        cons.add_request(f"f-{mode}", {"prompt_token_ids": prompt}, greedy(8), kv_transfer_params=fake.params(4))
        cons.step()
        assert cons.stats().scheduler.num_waiting_for_remote_kv == 1
        out = run(cons, timeout=15)[f"f-{mode}"]  # stall: given up after kv_load_timeout (2 s)
    finally:
        fake.close()
    assert out.outputs[0].token_ids == expected and out.error is None
    assert cons.stats().kv_transfer.load_failures == failures + 1
    cons.check_integrity()
    assert cons.num_used_blocks == 0


def test_fail_policy_and_abort_while_pulling(tiny_llama_dir):
    cons = LLMEngine(EngineConfig(model=str(tiny_llama_dir), kv_role="consumer", kv_load_timeout=1.0,
                                  kv_load_failure_policy="fail", **BASE))
    try:
        layout = cons.kv_connector.block_layout()
        block_bytes = cons.kv_connector.read_blocks([0]).numel()
        fake = FakeProducer("close", layout, block_bytes)
        cons.add_request("fails", {"prompt_token_ids": ids(30)}, greedy(4), kv_transfer_params=fake.params(2))
        out = run(cons)["fails"]
        fake.close()
        assert out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids == []
        assert out.error.startswith("the KV transfer from the prefill instance failed: ")
        assert cons.num_used_blocks == 0
        # Aborted while its pull is in flight: the blocks stay taken until the pull ends, then are freed.
        fake = FakeProducer("stall", layout, block_bytes)
        cons.add_request("left", {"prompt_token_ids": ids(30)}, greedy(4), kv_transfer_params=fake.params(2))
        cons.step()
        assert cons.scheduler.waiting_for_remote_kv["left"].status == RequestStatus.WAITING_FOR_REMOTE_KV
        cons.abort_request("left")
        assert cons.num_used_blocks == 2 and not cons.has_unfinished_requests()
        cons.check_integrity()
        deadline = time.monotonic() + 10
        while cons.num_used_blocks:
            assert time.monotonic() < deadline
            cons.step()
            time.sleep(0.01)
        fake.close()
        cons.check_integrity()
    finally:
        cons.close()


def test_one_instance_in_both_roles_pulls_from_itself(tiny_llama_dir, engines):
    """--kv-role both: a router may send a request's prefill and its decode to the same instance, under
    the same id; the lease and the decoding request live side by side."""
    _, _, mono = engines
    both = LLMEngine(EngineConfig(model=str(tiny_llama_dir), kv_role="both", kv_port=free_port(),
                                  **{**BASE, "enable_prefix_caching": False}))
    try:
        prompt = ids(45)
        mono.add_request("ref", {"prompt_token_ids": prompt}, greedy(9))
        expected = run(mono)["ref"].outputs[0].token_ids
        params = prefill(both, "same", prompt)
        both.add_request("same", {"prompt_token_ids": prompt}, greedy(9), kv_transfer_params=params)
        out = run(both)["same"]
        assert out.outputs[0].token_ids == expected and out.num_cached_tokens == 44
        settle(both)
        assert both.stats().kv_transfer.blocks_sent == 3 and both.num_used_blocks == 0
        both.check_integrity()
    finally:
        both.close()


def test_kv_transfer_params_parsing():
    assert parse_kv_transfer_params(None) == (False, None)
    assert parse_kv_transfer_params(REMOTE_DECODE) == (True, None)
    ok = {"do_remote_prefill": True, "remote_block_ids": [3, 4], "remote_host": "h", "remote_port": 7,
          "remote_request_id": "r", "remote_engine_id": "e"}
    assert parse_kv_transfer_params(ok)[1].block_ids == [3, 4]
    for field, bad in [("remote_block_ids", None), ("remote_port", "80"), ("remote_host", ""),
                       ("tp_size", 2)]:
        with pytest.raises(ValueError, match=field):
            parse_kv_transfer_params({**ok, field: bad})
