"""Config parsing and validation: both config.json spellings, and errors that name the field."""

import dataclasses
import json

import numpy as np
import pytest

from msjax.checkpoint import read_config
from msjax.config import ModelConfig, RopeConfig
from msjax.errors import ConfigError, UnknownArchitectureError
from msjax.models.families import family_for_config
from msjax.models.rope import rope_frequencies
from tests.model_utils import tiny_config

MIXTRAL_V4 = {"architectures": ["MixtralForCausalLM"], "vocab_size": 100, "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
              "head_dim": None, "num_local_experts": 4, "num_experts_per_tok": 2, "rope_theta": 1e6,
              "rope_scaling": {"type": "linear", "factor": 2.0}, "rms_norm_eps": 1e-5, "eos_token_id": 2}


def _parse(hf: dict) -> ModelConfig:
    return family_for_config(hf).config_from_hf(hf)


def test_v4_spelling():
    cfg = _parse(MIXTRAL_V4)
    assert cfg.head_dim == 8  # head_dim: null -> hidden / heads
    assert cfg.rope == RopeConfig(theta=1e6, kind="linear", factor=2.0)
    assert cfg.eos_token_ids == (2,) and cfg.topk_norm_p == 1.0


def test_v5_spelling_gives_the_same_config():
    v5 = {k: v for k, v in MIXTRAL_V4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    assert _parse(v5) == _parse(MIXTRAL_V4)


def test_unknown_architecture_is_named():
    with pytest.raises(UnknownArchitectureError, match="LlamaForCausalLM.*supported: DbrxForCausalLM"):
        _parse({**MIXTRAL_V4, "architectures": ["LlamaForCausalLM"]})


def test_missing_field_is_named(tmp_path):
    hf = dict(MIXTRAL_V4)
    del hf["num_local_experts"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="num_local_experts: missing from config.json"):
        read_config(tmp_path)
    with pytest.raises(ConfigError, match="ffn_config.moe_num_experts"):
        _parse({"architectures": ["DbrxForCausalLM"], "vocab_size": 10, "d_model": 8, "n_heads": 2,
                "n_layers": 1, "ffn_config": {"ffn_hidden_size": 4, "moe_top_k": 1}})


def test_bad_config_files(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        read_config(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("num_kv_heads", 4, "num_key_value_heads"),
    ("top_k", 9, "num_experts_per_tok"),
    ("num_experts", 0, "num_experts"),
    ("head_dim", -8, "head_dim"),
    ("clip_qkv", -1.0, "clip_qkv"),
])
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{field: value})


def test_unsupported_features_are_refused():
    with pytest.raises(ConfigError, match="rope_type"):
        _parse({**MIXTRAL_V4, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="sliding_window"):
        _parse({**MIXTRAL_V4, "sliding_window": 4096})
    qwen = {"architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 4,
            "mlp_only_layers": [1]}
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        _parse(qwen)


def test_rope_frequencies():
    inv, scale = rope_frequencies(RopeConfig(theta=10000.0), 8, 128)
    np.testing.assert_allclose(inv, 1 / 10000 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)
    assert scale == 1.0
    lin, _ = rope_frequencies(RopeConfig(theta=10000.0, kind="linear", factor=4.0), 8, 128)
    np.testing.assert_allclose(lin, inv / 4, rtol=1e-6)
    yarn, yarn_scale = rope_frequencies(RopeConfig(theta=10000.0, kind="yarn", factor=4.0,
                                                   original_max_position_embeddings=32), 8, 128)
    assert yarn_scale == pytest.approx(0.1 * np.log(4) + 1)
    assert np.all(yarn <= inv + 1e-9) and np.all(yarn >= inv / 4 - 1e-9)  # between interpolation and extrapolation


def test_param_count_of_presets():
    from msjax.models.presets import preset_config
    # published sizes: Mixtral 8x7B 46.7B, 8x22B 141B, DBRX 132B, the paper's Scaled-MoE 317B
    for name, billions in [("mixtral-8x7b", 46.7), ("mixtral-8x22b", 141), ("dbrx", 132), ("scaled-moe", 317)]:
        assert preset_config(name).param_count() / 1e9 == pytest.approx(billions, rel=0.01), name
    assert dataclasses.replace(preset_config("dbrx"), num_layers=2) == preset_config("dbrx", num_layers=2)
