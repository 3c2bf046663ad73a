"""Mixtral: top-k softmax routing renormalised to sum one; experts `w1` (gate), `w3` (up), `w2` (down)."""

from __future__ import annotations

import numpy as np

from msjax.config import ModelConfig
from msjax.errors import ConfigError
from msjax.models.families import hf as H

ARCHITECTURES = ("MixtralForCausalLM",)


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("sliding_window") is not None:
        raise ConfigError("sliding_window", "sliding-window attention is not supported (set it to null)")
    return H.llama_style_config(
        hf, architecture=ARCHITECTURES[0],
        num_experts=H.field(hf, "num_local_experts"),
        top_k=H.field(hf, "num_experts_per_tok"),
        expert_ffn_size=H.field(hf, "intermediate_size"),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        topk_norm_p=1.0,
    )


def global_tensors(r, cfg: ModelConfig) -> dict[str, np.ndarray]:
    return H.llama_style_globals(r, cfg)


def attention_tensors(r, cfg: ModelConfig, layer: int) -> dict[str, np.ndarray]:
    out = H.llama_style_attention(r, cfg, layer)
    out["router"] = H.linear(r, f"model.layers.{layer}.block_sparse_moe.gate.weight", cfg.num_experts,
                             cfg.hidden_size)
    return out


def expert_tensors(r, cfg: ModelConfig, layer: int, expert: int):
    return H.gate_up_down(r, cfg, f"model.layers.{layer}.block_sparse_moe.experts.{expert}", ("w1", "w3", "w2"))
