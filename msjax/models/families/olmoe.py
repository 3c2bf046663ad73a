"""OLMoE: RMSNorm over the whole q and k projections, `clip_qkv` after those norms, no top-k
renormalisation by default (`norm_topk_prob: false`)."""

from __future__ import annotations

from msjax.config import ModelConfig
from msjax.models.families import hf as H

ARCHITECTURES = ("OlmoeForCausalLM",)


def config_from_hf(hf: dict) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return H.llama_style_config(
        hf, architecture=ARCHITECTURES[0],
        num_experts=H.any_field(hf, "num_experts", "num_local_experts"),
        top_k=H.field(hf, "num_experts_per_tok"),
        expert_ffn_size=H.field(hf, "intermediate_size"),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        topk_norm_p=1.0 if hf.get("norm_topk_prob", False) else None,
        qk_norm="full",
        clip_qkv=hf.get("clip_qkv"),
        clip_after_qk_norm=True,
        qkv_bias=bias,
        o_bias=bias,
    )


global_tensors = H.llama_style_globals
attention_tensors = H.attention_with_mlp_gate
expert_tensors = H.mlp_expert
