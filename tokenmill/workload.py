"""Workload files: the requests a benchmark or the simulator replays, one JSON object per line.

    {"prompt_token_ids": [27662, 2753, ...], "max_tokens": 128, "priority": 0, "tenant": "a"}

as `tokenmill bench workload` (make_workload) writes them, draw for draw what the team's shared
`bench/workload.py` writes for the same arguments. `max_tokens` is required; `priority` (an integer,
default 0) and `tenant` (default "default") matter to the scheduling policies that read them.
Where the reader allows text (`tokenmill bench serve`, which can drive any OpenAI server), a line
may give `"prompt": "some text"` instead of token ids. Blank lines are skipped; anything else that
is not a valid request is an error naming the file and line.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass


@dataclass
class WorkloadRecord:
    prompt_token_ids: list[int] | None  # None only for a text prompt
    max_tokens: int
    priority: int = 0
    tenant: str = "default"
    prompt: str | None = None  # the text prompt, where prompt_token_ids is None

    @property
    def prompt_len(self) -> int:
        """Prompt tokens (0 for a text prompt: the server counts them)."""
        return len(self.prompt_token_ids) if self.prompt_token_ids is not None else 0


def load_workload(path: str, num_requests: int | None = None, allow_text: bool = False) -> list[WorkloadRecord]:
    """The file's requests, the first `num_requests` of them when given."""
    records: list[WorkloadRecord] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if num_requests is not None and len(records) >= num_requests:
                break
            if line.strip():
                records.append(_parse(line, f"{path}:{lineno}", allow_text))
    if not records:
        raise ValueError(f"{path}: the workload has no requests")
    return records


def _parse(line: str, where: str, allow_text: bool) -> WorkloadRecord:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a line must be a JSON object")
    ids, text = d.get("prompt_token_ids"), d.get("prompt")
    if _is_token_list(ids):
        text = None
    elif not (allow_text and ids is None and isinstance(text, str) and text):
        need = "prompt_token_ids (a non-empty list of integers)" + (" or prompt (text)" if allow_text else "")
        raise ValueError(f"{where}: a request needs {need}")
    max_tokens = d.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"{where}: max_tokens must be a positive integer, got {max_tokens!r}")
    priority = d.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"{where}: priority must be an integer, got {priority!r}")
    return WorkloadRecord(ids, max_tokens, priority, str(d.get("tenant", "default")), text)


def _is_token_list(ids) -> bool:
    return isinstance(ids, list) and bool(ids) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)


def make_workload(n: int = 128, vocab_size: int = 49152, prompt: tuple[int, int] = (32, 256),
                  output: tuple[int, int] = (32, 256), seed: int = 0, shared_prefix: int = 0) -> list[dict]:
    """n requests of random token ids in [100, vocab_size - 100): a prompt of `shared_prefix` ids all
    requests share, then U[prompt] ids of its own, and U[output] max_tokens (bounds included).

    NOTE: the draws come in the shared script's order (the prefix, then per request its prompt
    length, its output length, its ids), so one seed gives the same file byte for byte."""
    rng = random.Random(seed)
    prefix = [rng.randrange(100, vocab_size - 100) for _ in range(shared_prefix)]
    requests = []
    for _ in range(n):
        prompt_len = rng.randint(*prompt)
        max_tokens = rng.randint(*output)
        ids = prefix + [rng.randrange(100, vocab_size - 100) for _ in range(prompt_len)]
        requests.append({"prompt_token_ids": ids, "max_tokens": max_tokens})
    return requests


def write_workload(path: str, requests: list[dict]) -> None:
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps(r) + "\n")
