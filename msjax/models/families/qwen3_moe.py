"""Qwen3-MoE: per-head RMSNorm on q and k before RoPE, `head_dim` independent of the hidden size."""

from __future__ import annotations

from msjax.config import ModelConfig
from msjax.models.families import hf as H

ARCHITECTURES = ("Qwen3MoeForCausalLM",)


def config_from_hf(hf: dict) -> ModelConfig:
    H.check_qwen_layout(hf)
    bias = bool(hf.get("attention_bias", False))
    return H.llama_style_config(
        hf, architecture=ARCHITECTURES[0],
        num_experts=H.any_field(hf, "num_experts", "num_local_experts"),
        top_k=H.field(hf, "num_experts_per_tok"),
        expert_ffn_size=H.field(hf, "moe_intermediate_size"),
        topk_norm_p=1.0 if hf.get("norm_topk_prob", False) else None,
        qk_norm="head",
        qkv_bias=bias,
        o_bias=bias,
    )


global_tensors = H.llama_style_globals
attention_tensors = H.attention_with_mlp_gate
expert_tensors = H.mlp_expert
