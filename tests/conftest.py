"""Shared fixtures: tiny random-weight models built in-process, and the real default model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import free_hf_models

from tokenmill.models.loader import resolve_model


@pytest.fixture(scope="module", autouse=True)
def _free_hf_models():
    """The transformers reference models (helpers.hf_greedy) are loaded once per module, then freed."""
    yield
    free_hf_models()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (converted from the bundled GGUF once)."""
    return resolve_model(None)


def _save_tiny(path: Path, config, tokenizer_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


# NOTE: initializer_range well above the usual 0.02 spreads the logits of a random model, so
# greedy decoding is decided by clear margins rather than by float rounding between near-ties.
_TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
             initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_dir) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(**_TINY, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), config, default_model_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, default_model_dir) -> Path:
    from transformers import Qwen2Config

    config = Qwen2Config(**_TINY, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
    return _save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), config, default_model_dir)


@pytest.fixture(params=["tiny_llama_dir", "tiny_qwen2_dir"])
def tiny_model_dir(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def ext():
    """tokenmill's compiled CPU extension; skips (with the compiler's reason) where it can't be built."""
    from tokenmill.models.layers.cpu_ops import load_extension

    try:
        module = load_extension()
    except RuntimeError as e:
        pytest.skip(str(e))
    return module


@pytest.fixture
def two_threads():
    """Two torch threads wherever the tests run, so the kernels' parallel split and the attention
    plan's choices (which depend on the thread count) are the same everywhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
