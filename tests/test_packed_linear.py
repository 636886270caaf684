"""Prepacked oneDNN linears: same results as nn.Linear, and every projection of a loaded model uses them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenmill.models.layers.linear import PackedLinear, prepack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_matches_nn_linear(bias, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_prepack_replaces_every_linear_of_the_loaded_model(tiny_llama_dir):
    from tokenmill import LLM

    model = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=64, num_kv_blocks=8).llm_engine.runner.model
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 4 * model.config.num_hidden_layers + 1
    nested = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2)))
    assert prepack_linears(nested) == 2 and not any(type(m) is nn.Linear for m in nested.modules())
