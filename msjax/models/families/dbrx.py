"""DBRX: fused `Wqkv` clamped to `clip_qkv`, LayerNorm without bias, rope theta inside `attn_config`, and all
experts of a layer fused into `w1` (gate), `v1` (up) and `w2` (down), each [experts * ffn, hidden]. An expert
node reads only its experts' rows of those tensors."""

from __future__ import annotations

import numpy as np

from msjax.config import ModelConfig
from msjax.errors import ConfigError
from msjax.models.families import hf as H

ARCHITECTURES = ("DbrxForCausalLM",)


def config_from_hf(hf: dict) -> ModelConfig:
    attn, ffn = hf.get("attn_config") or {}, hf.get("ffn_config") or {}
    act = (ffn.get("ffn_act_fn") or {}).get("name", "silu")
    if act != "silu":
        raise ConfigError("ffn_config.ffn_act_fn", f"only silu experts are supported, got {act!r}")
    heads = H.field(hf, "n_heads")
    norm_p = ffn.get("moe_normalize_expert_weights", 1)
    return ModelConfig(
        architecture=ARCHITECTURES[0],
        vocab_size=H.field(hf, "vocab_size"),
        hidden_size=H.field(hf, "d_model"),
        num_layers=H.field(hf, "n_layers"),
        num_heads=heads,
        num_kv_heads=attn.get("kv_n_heads", 1),
        head_dim=H.field(hf, "d_model") // heads,
        num_experts=H.field(hf, "moe_num_experts", section="ffn_config"),
        top_k=H.field(hf, "moe_top_k", section="ffn_config"),
        expert_ffn_size=H.field(hf, "ffn_hidden_size", section="ffn_config"),
        rope=H.rope_config(hf, theta=attn.get("rope_theta", 10000.0) if "rope_parameters" not in hf else None),
        norm_kind="layernorm",
        norm_eps=1e-5,
        clip_qkv=attn.get("clip_qkv"),
        topk_norm_p=None if norm_p is None else float(norm_p),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_seq_len", 2048)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=H.eos_ids(hf),
    )


def global_tensors(r, cfg: ModelConfig) -> dict[str, np.ndarray]:
    out = {"embed": r.get("transformer.wte.weight", (cfg.vocab_size, cfg.hidden_size)),
           "final_norm": r.get("transformer.norm_f.weight", (cfg.hidden_size,))}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = H.linear(r, "lm_head.weight", cfg.vocab_size, cfg.hidden_size)
    return out


def attention_tensors(r, cfg: ModelConfig, layer: int) -> dict[str, np.ndarray]:
    p = f"transformer.blocks.{layer}"
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    wqkv = H.linear(r, f"{p}.norm_attn_norm.attn.Wqkv.weight", q + 2 * kv, h)  # [h, q + 2kv]
    return {
        "input_norm": r.get(f"{p}.norm_attn_norm.norm_1.weight", (h,)),
        "post_norm": r.get(f"{p}.norm_attn_norm.norm_2.weight", (h,)),
        "wq": wqkv[:, :q], "wk": wqkv[:, q:q + kv], "wv": wqkv[:, q + kv:],
        "wo": H.linear(r, f"{p}.norm_attn_norm.attn.out_proj.weight", h, q),
        "router": H.linear(r, f"{p}.ffn.router.layer.weight", cfg.num_experts, h),
    }


def expert_tensors(r, cfg: ModelConfig, layer: int, expert: int):
    p = f"transformer.blocks.{layer}.ffn.experts.mlp"
    e, f, h = cfg.num_experts, cfg.expert_ffn_size, cfg.hidden_size
    rows = (expert * f, (expert + 1) * f)
    gate = r.get_rows(f"{p}.w1", (e * f, h), *rows).T  # [h, f]
    up = r.get_rows(f"{p}.v1", (e * f, h), *rows).T
    down = r.get_rows(f"{p}.w2", (e * f, h), *rows)  # stored [f, h]: used as x @ w2
    return np.concatenate([gate, up], axis=1), down
