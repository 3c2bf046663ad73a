"""Qwen2-MoE (Qwen1.5-MoE): q/k/v biases, optional top-k renormalisation, and a shared expert on every token
whose output is scaled by sigmoid(x @ shared_expert_gate). The shared expert stays with attention."""

from __future__ import annotations

import numpy as np

from msjax.config import ModelConfig
from msjax.models.families import hf as H

ARCHITECTURES = ("Qwen2MoeForCausalLM",)


def config_from_hf(hf: dict) -> ModelConfig:
    H.check_qwen_layout(hf)
    return H.llama_style_config(
        hf, architecture=ARCHITECTURES[0],
        num_experts=H.any_field(hf, "num_experts", "num_local_experts"),
        top_k=H.field(hf, "num_experts_per_tok"),
        expert_ffn_size=H.field(hf, "moe_intermediate_size"),
        topk_norm_p=1.0 if hf.get("norm_topk_prob", False) else None,
        shared_expert_ffn_size=int(hf.get("shared_expert_intermediate_size") or 0),
        shared_expert_gated=True,
        qkv_bias=bool(hf.get("qkv_bias", True)),
    )


global_tensors = H.llama_style_globals
expert_tensors = H.mlp_expert


def attention_tensors(r, cfg: ModelConfig, layer: int) -> dict[str, np.ndarray]:
    out = H.attention_with_mlp_gate(r, cfg, layer)
    if cfg.has_shared_expert:
        p = f"model.layers.{layer}.mlp"
        out["shared_gate_up"], out["shared_down"] = H.gate_up_down(
            r, cfg, f"{p}.shared_expert", ffn=cfg.shared_expert_ffn_size)
        out["shared_gate"] = H.linear(r, f"{p}.shared_expert_gate.weight", 1, cfg.hidden_size)
    return out
