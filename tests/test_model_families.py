"""Every supported architecture, as a tiny random-weight model built in-process from a transformers
config, greedy float32 token for token against transformers' `generate`.

One engine run per architecture covers the cases: one prompt alone; then a mixed batch that hits
the prefix cache (it shares the first prompt's leading blocks), with a token budget smaller than
every prompt (each is prefilled in several chunks) and a cache too small for the whole batch (some
requests are preempted and recomputed); every block is free afterwards. The configs use GQA,
head_dim != hidden / heads where the family has an explicit head_dim, a sliding window shorter than
the prompts where the family has one, and MoE experts with top-2 of 4.

MoE routing ties: the router weights are scaled by 4 before saving (well-separated softmax), and
the test records, for every token the engine routes, the gap between the k-th and the (k+1)-th
router logit, and asserts the smallest is far above float32 rounding.
"""
from __future__ import annotations

import random

import pytest
import torch
import transformers
from conftest import _TINY
from helpers import hf_greedy

from tokenmill import LLM, SamplingParams
from tokenmill.models.moe import SparseMoeBlock
from tokenmill.worker.kv_cache import kv_bytes_per_block

pytestmark = pytest.mark.usefixtures("two_threads")

BASE = dict(_TINY)
WINDOW = 24
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> (config class, architecture, extra config fields)
FAMILIES = {
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=24, rope_parameters=LLAMA3)),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM",
                          dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "llama-dynamic-rope": ("LlamaConfig", "LlamaForCausalLM",
                           dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "llama-yarn-rope": ("LlamaConfig", "LlamaForCausalLM",
                        dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                              "original_max_position_embeddings": 256})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(head_dim=24, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=24, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                       norm_topk_prob=True, mlp_only_layers=[1])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                       shared_expert_intermediate_size=40, norm_topk_prob=False)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW, attn_logit_softcapping=5.0,
                    final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(sliding_window=WINDOW, max_position_embeddings=1024, pad_token_id=0,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                   "original_max_position_embeddings": 64,
                                   "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.0, 2.0, 4.0, 8.0]})),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(pad_token_id=0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0)),
}

# The families that run their layers through models/layers/decoder_stack.py (on the cpu backend).
STACKED = {"llama3-rope", "llama-linear-rope", "llama-dynamic-rope", "llama-yarn-rope", "phi3"}

# Prompts of at most 64 tokens (Phi-3's longrope switches to its long factors past 64, which
# transformers applies to a whole prompt at once), 16 new tokens each: the decodes go past the window
# and past position 64. The batch's first prompt shares the first prompt's leading 32 tokens. A
# 16-token budget splits every prompt; 14 blocks of 8 tokens hold the longest request (76 tokens)
# but not the batch.
LENS, MAX_TOKENS, BLOCK_SIZE, MAX_MODEL_LEN, BUDGET = [30, 45, 20, 60], 16, 8, 96, 16


def _prompts() -> list[list[int]]:
    rng = random.Random(2024)
    first = [rng.randrange(100, 49000) for _ in range(50)]
    batch = [first[:32] + [rng.randrange(100, 49000) for _ in range(LENS[0] - 32 + 10)]]
    batch += [[rng.randrange(100, 49000) for _ in range(n)] for n in LENS[1:]]
    return [first] + batch


_DIRS: dict[str, object] = {}


@pytest.fixture
def family_dir(request, tmp_path_factory, default_model_dir):
    name = request.param
    if name not in _DIRS:
        cls_name, arch, extra = FAMILIES[name]
        fields = {**BASE, "tie_word_embeddings": False, **extra, "architectures": [arch]}
        config = getattr(transformers, cls_name)(**fields)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("mlp.gate.weight"):
                    p.mul_(4.0)  # well-separated routing (see the module docstring)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        transformers.AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(path)
        _DIRS[name] = path
    return _DIRS[name]


# The torch backend once, on the family with both soft-capping and sliding windows.
CASES = [(name, "cpu") for name in FAMILIES] + [("gemma2", "torch")]


@pytest.mark.parametrize("family_dir,backend", CASES, ids=[f"{n}-{b}" for n, b in CASES], indirect=["family_dir"])
def test_family_matches_hf(family_dir, backend, request, monkeypatch):
    if backend == "cpu":
        request.getfixturevalue("ext")
    gaps = []
    route = SparseMoeBlock.route

    def recording_route(self, x):
        experts, weights = route(self, x)
        logits = self.gate(x).float().sort(dim=-1, descending=True).values
        gaps.append(float((logits[:, self.top_k - 1] - logits[:, self.top_k]).min()))
        return experts, weights

    monkeypatch.setattr(SparseMoeBlock, "route", recording_route)
    config = transformers.AutoConfig.from_pretrained(family_dir)
    num_blocks = MAX_MODEL_LEN // BLOCK_SIZE + 2
    llm = LLM(str(family_dir), dtype="float32", attention_backend=backend, max_model_len=MAX_MODEL_LEN,
              block_size=BLOCK_SIZE, kv_cache_memory=num_blocks * kv_bytes_per_block(config, BLOCK_SIZE, torch.float32),
              max_num_batched_tokens=BUDGET, enable_admission_control=False)
    engine = llm.llm_engine
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)[0]
    assert first.outputs[0].token_ids == hf_greedy(family_dir, prompts[0], MAX_TOKENS), "the single prompt differs"
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
    for i, out in enumerate(outputs):
        assert out.outputs[0].token_ids == hf_greedy(family_dir, prompts[i + 1], MAX_TOKENS), f"prompt {i + 1} differs"
    stats = engine.stats().scheduler
    assert stats.prefix_cache_hits >= 32, "the batch did not hit the prefix cache"
    assert engine.scheduler.num_preemptions > 0, "no request was preempted"
    engine.check_integrity()
    assert engine.num_used_blocks == 0
    # The families whose layers are plain Llama layers ran them as one C++ call, the others in Python.
    name = request.node.callspec.params["family_dir"]
    assert (engine.runner.model.decoder_stack is not None) == (backend == "cpu" and name in STACKED), name
    if "Moe" in config.architectures[0] or "Mixtral" in config.architectures[0]:
        # float32 rounding of these logits (|logit| < 10) is ~1e-6: a gap 20x that cannot flip.
        assert gaps and min(gaps) > 2e-5, f"near-tie in the routing: top-k logit gap {min(gaps)}"


def test_unsupported_architecture_is_refused(tmp_path, tiny_llama_dir):
    import json
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architecture \['FalconForCausalLM'\]; supported: "
                                         r"\['Gemma2ForCausalLM', 'Gemma3ForCausalLM', 'GraniteForCausalLM'"):
        LLM(str(folder), dtype="float32")


def test_partial_rotary_with_and_without_kernels(ext):
    """Phi-3's partial rotary (first half of each head) and longrope tables: the in-place kernel
    and the plain PyTorch path rotate the same dims the same way and leave the rest untouched."""
    from tokenmill.models.layers.rotary import RotaryEmbedding

    _, _, extra = FAMILIES["phi3"]
    config = transformers.Phi3Config(**{**BASE, **extra})
    fused, plain = RotaryEmbedding(config, 128, ext), RotaryEmbedding(config, 128, None)
    assert fused.rotary_dim == 8
    x = torch.randn(5, 6, 16)
    positions = torch.tensor([0, 3, 63, 64, 100])
    a = fused.for_positions(positions, x.dtype)(x.clone())
    b = plain.for_positions(positions, x.dtype)(x.clone())
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert torch.equal(a[..., 8:], x[..., 8:]) and not torch.allclose(a[1:, :, :8], x[1:, :, :8])
