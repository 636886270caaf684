"""`make fuzz`: schemathesis against a real `tokenmill serve`, every check, on a tiny random model.

    .venv/bin/python benchmarks/fuzz.py [--max-examples 100] [--seed N] [--model DIR]

Builds a tiny random-weight Llama with the default model's tokenizer (unless --model names one),
serves it with --max-tokens-limit 16 --default-max-tokens 8 (so no fuzzed request generates for
long), runs `schemathesis run /openapi.json --checks all` with the repository's schemathesis.toml
and exits with schemathesis's status.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def tiny_model(path: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from tokenmill.models.loader import resolve_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model(None)).save_pretrained(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-examples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "tiny"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--model", model,
                                   "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
                                   "--num-kv-blocks", "128", "--max-tokens-limit", "16", "--default-max-tokens", "8",
                                   "--tool-call-parser", "hermes"], env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    print("the server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.3)
            cmd = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json", "--checks", "all",
                   "--max-examples", str(args.max_examples), "--workers", "1"]
            if args.seed is not None:
                cmd += ["--seed", str(args.seed)]
            return subprocess.call(cmd, cwd=ROOT)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
