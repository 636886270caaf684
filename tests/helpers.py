"""What the tests share (as vLLM's tests/v1/core/utils.py): random token ids and greedy params, a
Scheduler built from a few knobs and driven by a fake model, and the Hugging Face greedy reference.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.config import EngineConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.scheduler import Scheduler, SchedulerOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams

# ---- prompts and sampling ---------------------------------------------------------------------------


class TokenIds:
    """ids(n): n random token ids in [100, 49000) from a generator of its own (.rng), one per test
    module, so a module's prompts do not depend on what other modules drew."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def __call__(self, n: int) -> list[int]:
        return [self.rng.randrange(100, 49000) for _ in range(n)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    """Greedy with ignore_eos: a request's tokens are a pure function of its prompt."""
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


# ---- a scheduler and a fake model -------------------------------------------------------------------


def make_scheduler(num_blocks: int = 8, block_size: int = 4, max_num_batched_tokens: int = 16,
                   max_num_seqs: int = 4, model_max_len: int = 1024, num_host_blocks: int = 0,
                   **knobs) -> Scheduler:
    """A Scheduler as the engine builds it, from an EngineConfig of these knobs. By default the bare
    mechanics: fcfs, recompute, no prefix caching, no admission control (each tested apart)."""
    knobs = {"num_threads": 1, "enable_admission_control": False, "enable_prefix_caching": False, **knobs}
    config = EngineConfig(block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
                          max_num_seqs=max_num_seqs, **knobs).finalize(model_max_len)
    return Scheduler.from_config(config, num_blocks, num_host_blocks)


def prompt_tokens(index: int, n: int) -> list[int]:
    """The prompt of the index-th request a Sim adds: ids no other request's prompt shares."""
    return [index * 1000 + j for j in range(n)]


def output_token(index: int, k: int) -> int:
    """The k-th token the fake model gives the index-th request."""
    return 10_000_000 + index * 1000 + k


class Sim:
    """A Scheduler driven by a fake model: each step, every scheduled request that will_sample gets
    its next token (output_token), and a request finishes (FINISHED_LENGTH) at max_tokens. Checks
    the block accounting after every step; records each request's first step and finishing step."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.reqs: dict[str, Request] = {}  # every request ever added
        self.index: dict[str, int] = {}
        self.first_step: dict[str, int] = {}
        self.finish_step: dict[str, int] = {}
        self.steps = 0

    @property
    def kv(self) -> KVCacheManager:
        return self.scheduler.kv

    def add(self, rid: str, prompt_len: int, max_tokens: int, arrival_time: float | None = None,
            priority: int = 0, tenant: str = "default") -> Request:
        """A new request; it arrives at its index (0, 1, ...) unless arrival_time says otherwise."""
        i = len(self.reqs)
        req = Request(rid, prompt_tokens(i, prompt_len), SamplingParams(max_tokens=max_tokens),
                      arrival_time=float(i) if arrival_time is None else arrival_time, priority=priority,
                      tenant=tenant)
        self.reqs[rid], self.index[rid] = req, i
        self.scheduler.add_request(req)
        return req

    def abort(self, req: Request) -> None:
        self.scheduler.finish_request(req, RequestStatus.FINISHED_ABORTED)
        assert req.status == RequestStatus.FINISHED_ABORTED
        assert req.block_ids == []
        assert req not in self.scheduler.running and req not in list(self.scheduler.policy)
        self.check_state()

    def schedule(self) -> SchedulerOutput:
        return self.scheduler.schedule()

    def step(self) -> SchedulerOutput:
        out = self.schedule()
        for s in out.scheduled:
            self.first_step.setdefault(s.request_id, self.steps)
            if s.will_sample:
                req = self.reqs[s.request_id]
                self.scheduler.append_token(req, output_token(self.index[req.request_id], req.num_output_tokens))
                if req.num_output_tokens >= req.sampling_params.max_tokens:
                    self.scheduler.finish_request(req, RequestStatus.FINISHED_LENGTH)
                    assert req.block_ids == []
                    self.finish_step[req.request_id] = self.steps
        self.steps += 1
        self.check_state()
        return out

    def check_state(self) -> None:
        self.scheduler.check_integrity()

    def run(self, max_steps: int = 10_000) -> None:
        while self.scheduler.num_unfinished:
            assert self.steps < max_steps, "the scheduler made no progress"
            self.step()
        self.check_all_done()

    def check_all_done(self) -> None:
        assert self.scheduler.num_unfinished == 0
        assert self.kv.num_used_blocks == 0
        assert self.kv.num_free_blocks == self.kv.pool.num_blocks
        for rid, req in self.reqs.items():
            assert req.is_finished
            if req.status == RequestStatus.FINISHED_LENGTH:
                i = self.index[rid]
                assert req.output_token_ids == [output_token(i, k) for k in range(req.sampling_params.max_tokens)]
                assert req.all_token_ids == prompt_tokens(i, req.num_prompt_tokens) + req.output_token_ids


# ---- the Hugging Face reference ---------------------------------------------------------------------

_HF_MODELS: dict[tuple[str, torch.dtype], torch.nn.Module] = {}
_HF_OUTPUTS: dict[tuple, tuple[list[int], list[list[int]]]] = {}


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = True,
              dtype: torch.dtype = torch.float32) -> list[int]:
    """transformers' `generate(do_sample=False)` on one prompt (no batch, no padding): its tokens."""
    return _hf_generate(model_dir, prompt_ids, max_new_tokens, ignore_eos, dtype)[0]


def hf_greedy_top5(model_dir: Path, prompt_ids: list[int], max_new_tokens: int,
                   dtype: torch.dtype = torch.float32) -> tuple[list[int], list[list[int]]]:
    """hf_greedy with ignore_eos, and per generated token transformers' 5 most likely token ids."""
    return _hf_generate(model_dir, prompt_ids, max_new_tokens, True, dtype)


def _hf_generate(model_dir: Path, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool,
                 dtype: torch.dtype) -> tuple[list[int], list[list[int]]]:
    """Computed once per model, dtype and prompt (the parity cases share their references)."""
    key = (str(model_dir), dtype, tuple(prompt_ids), max_new_tokens, ignore_eos)
    if key not in _HF_OUTPUTS:
        from transformers import AutoModelForCausalLM

        model = _HF_MODELS.get((str(model_dir), dtype))
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
            _HF_MODELS[(str(model_dir), dtype)] = model
        ids = torch.tensor([prompt_ids])
        extra = {"eos_token_id": None} if ignore_eos else {}
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, **extra)
        tokens = out.sequences[0, len(prompt_ids):].tolist()
        if ignore_eos:
            assert len(tokens) == max_new_tokens, "the reference stopped early: EOS was not ignored"
        _HF_OUTPUTS[key] = (tokens, [step[0].float().topk(5).indices.tolist() for step in out.logits])
    return _HF_OUTPUTS[key]


def free_hf_models() -> None:
    """Drop the loaded transformers models (the references computed stay)."""
    _HF_MODELS.clear()


# ---- server processes --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tokenmill serve --model model_dir --port <free> *args` in a subprocess; `url` once /health answers."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--model", str(model_dir),
               "--port", str(self.port), *args]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 120.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def metrics(self) -> dict[tuple[str, str | None], float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {(s.name, s.labels.get("finished_reason")): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


ROUTER_BIN = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")


class Router:
    """`vllm-router` over the given worker URLs (or in P/D mode with `pd`)."""

    def __init__(self, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        # NOTE: a free Prometheus port too: its default (29000) would clash between routers.
        cmd = [ROUTER_BIN, "--host", "127.0.0.1", "--port", str(self.port), "--prometheus-port",
               str(free_port()), "--worker-startup-check-interval", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> "Router":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"router not ready after {timeout} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
