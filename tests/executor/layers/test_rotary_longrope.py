"""LongRoPE tables (layers/rotary.py) against transformers' Phi3RotaryEmbedding: the short
factors within original_max_position_embeddings, the long ones from there on (transformers
uses them for a whole sequence longer than that; our table for those positions), and the
cos/sin multiplier; model_files.rope_settings for both config layouts."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import Phi3Config
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from aphrodite.executor.layers.rotary import RotaryEmbedding
from aphrodite.model_files import head_dim, rope_settings

MAX, ORIGINAL, HEAD_DIM = 256, 64, 16


def _config(**scaling) -> Phi3Config:
    generator = torch.Generator().manual_seed(0)
    factors = {"short_factor": (1 + 2 * torch.rand(HEAD_DIM // 2, generator=generator)).tolist(),
               "long_factor": (4 + 12 * torch.rand(HEAD_DIM // 2, generator=generator)).tolist()}
    return Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=MAX, original_max_position_embeddings=ORIGINAL,
                      rope_scaling={"rope_type": "longrope", **factors, **scaling})


def _hf_cos_sin(config: Phi3Config, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos/sin for one sequence of `length` tokens, [length, head_dim]."""
    rotary = Phi3RotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
    return cos[0], sin[0]


def _ours(config) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim(config), MAX, rope_settings(config), torch.float32)


@pytest.mark.parametrize("scaling", [{}, {"attention_factor": 0.8}, {"factor": 2.0}],
                         ids=["default-attention-factor", "attention-factor", "factor"])
def test_tables_match_transformers(scaling):
    config = _config(**scaling)
    ours = _ours(config)
    half = HEAD_DIM // 2
    short_cos, short_sin = _hf_cos_sin(config, ORIGINAL)      # within the original context
    long_cos, long_sin = _hf_cos_sin(config, MAX)             # beyond it: the long factors
    expected_cos = torch.cat([short_cos, long_cos[ORIGINAL:]])
    expected_sin = torch.cat([short_sin, long_sin[ORIGINAL:]])
    torch.testing.assert_close(ours.cos, expected_cos, atol=0, rtol=0)
    # our sin table folds rotate-half's sign in: (-sin, sin)
    torch.testing.assert_close(ours.sin[:, half:], expected_sin[:, half:], atol=0, rtol=0)
    torch.testing.assert_close(ours.sin[:, :half], -expected_sin[:, :half], atol=0, rtol=0)


def test_attention_factor():
    def scale(config) -> float:
        return _ours(config).cos[0, 0].item()        # cos(0) times the multiplier
    assert scale(_config()) == pytest.approx(math.sqrt(1 + math.log(MAX / ORIGINAL) / math.log(ORIGINAL)))
    assert scale(_config(attention_factor=0.8)) == pytest.approx(0.8)
    assert scale(_config(factor=2.0)) == pytest.approx(math.sqrt(1 + math.log(2.0) / math.log(ORIGINAL)))
    no_extension = _config()
    no_extension.max_position_embeddings = ORIGINAL
    assert scale(no_extension) == 1.0


def test_rope_settings_from_transformers_4_layout():
    """A config object without rope_parameters: rope_scaling with "type", the original length
    beside it at the top level, as Phi-3's config.json files have them."""
    scaling = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    config = SimpleNamespace(rope_scaling=scaling, rope_theta=500.0, max_position_embeddings=MAX,
                             original_max_position_embeddings=ORIGINAL)
    rope = rope_settings(config)
    assert (rope.rope_type, rope.theta) == ("longrope", 500.0)
    assert rope.params["original_max_position_embeddings"] == ORIGINAL
    assert rope.params["factor"] == MAX / ORIGINAL
