"""Helpers shared by the family modules: reading HF config fields in both the transformers 4.x and 5.x
spellings, and the tensor names that llama-style checkpoints have in common."""

from __future__ import annotations

import numpy as np

from msjax.config import ModelConfig, RopeConfig
from msjax.errors import ConfigError

_MISSING = object()


def field(hf: dict, name: str, default=_MISSING, *, section: str | None = None):
    """hf[name] (or hf[section][name]); a missing required field is a ConfigError naming it."""
    src = hf if section is None else (hf.get(section) or {})
    value = src.get(name, default) if isinstance(src, dict) else default
    if value is _MISSING:
        where = name if section is None else f"{section}.{name}"
        raise ConfigError(where, "missing from config.json")
    return value


def any_field(hf: dict, *names: str):
    """The first of `names` present: transformers 5.x renamed some fields (e.g. Qwen3-MoE's `num_experts`
    became `num_local_experts`)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise ConfigError(names[0], "missing from config.json" + (f" (nor {', '.join(names[1:])})" if names[1:] else ""))


def eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def rope_config(hf: dict, theta_default: float = 10000.0, theta: float | None = None) -> RopeConfig:
    """RoPE from `rope_theta` + `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_type" not in params and "rope_theta" not in params:
        params = next(iter(params.values()), None)  # 5.x per-attention-type form {"full_attention": {...}}
    if isinstance(params, dict):
        scaling = dict(params)
        theta = scaling.pop("rope_theta", theta if theta is not None else hf.get("rope_theta", theta_default))
    else:
        scaling = dict(hf.get("rope_scaling") or {})
        theta = theta if theta is not None else hf.get("rope_theta", theta_default)
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    allowed = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
               "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}
    kwargs = {k: v for k, v in scaling.items() if k in allowed and v is not None}
    return RopeConfig(theta=float(theta), kind=kind, **kwargs)


def llama_style_config(hf: dict, *, architecture: str, **overrides) -> ModelConfig:
    """Fields named as in Llama-derived configs (Mixtral, Qwen2/3-MoE, OLMoE)."""
    hidden = field(hf, "hidden_size")
    heads = field(hf, "num_attention_heads")
    base = dict(
        architecture=architecture,
        vocab_size=field(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=field(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        rope=rope_config(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
    )
    base.update(overrides)
    return ModelConfig(**base)


def linear(r, name: str, out_features: int, in_features: int) -> np.ndarray:
    """An nn.Linear weight [out, in] as an msjax matrix [in, out]."""
    return r.get(name, (out_features, in_features)).T


def llama_style_globals(r, cfg: ModelConfig, prefix: str = "model") -> dict[str, np.ndarray]:
    out = {
        "embed": r.get(f"{prefix}.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)),
        "final_norm": r.get(f"{prefix}.norm.weight", (cfg.hidden_size,)),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head"] = linear(r, "lm_head.weight", cfg.vocab_size, cfg.hidden_size)
    return out


def llama_style_attention(r, cfg: ModelConfig, layer: int) -> dict[str, np.ndarray]:
    """Norms and q/k/v/o projections (+ biases, q/k norms where the config has them)."""
    p = f"model.layers.{layer}"
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {
        "input_norm": r.get(f"{p}.input_layernorm.weight", (h,)),
        "post_norm": r.get(f"{p}.post_attention_layernorm.weight", (h,)),
        "wq": linear(r, f"{p}.self_attn.q_proj.weight", q, h),
        "wk": linear(r, f"{p}.self_attn.k_proj.weight", kv, h),
        "wv": linear(r, f"{p}.self_attn.v_proj.weight", kv, h),
        "wo": linear(r, f"{p}.self_attn.o_proj.weight", h, q),
    }
    if cfg.qkv_bias:
        out |= {"bq": r.get(f"{p}.self_attn.q_proj.bias", (q,)), "bk": r.get(f"{p}.self_attn.k_proj.bias", (kv,)),
                "bv": r.get(f"{p}.self_attn.v_proj.bias", (kv,))}
    if cfg.o_bias:
        out["bo"] = r.get(f"{p}.self_attn.o_proj.bias", (h,))
    if cfg.qk_norm != "none":
        q_dim, k_dim = (cfg.head_dim, cfg.head_dim) if cfg.qk_norm == "head" else (q, kv)
        out["q_norm"] = r.get(f"{p}.self_attn.q_norm.weight", (q_dim,))
        out["k_norm"] = r.get(f"{p}.self_attn.k_norm.weight", (k_dim,))
    return out


def gate_up_down(r, cfg: ModelConfig, prefix: str, names=("gate_proj", "up_proj", "down_proj"),
                 ffn: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One SwiGLU MLP stored as three nn.Linear weights -> (w_gate_up [h, 2f], w_down [f, h])."""
    f, h = ffn or cfg.expert_ffn_size, cfg.hidden_size
    gate = linear(r, f"{prefix}.{names[0]}.weight", f, h)
    up = linear(r, f"{prefix}.{names[1]}.weight", f, h)
    down = linear(r, f"{prefix}.{names[2]}.weight", h, f)
    return np.concatenate([gate, up], axis=1), down


def attention_with_mlp_gate(r, cfg: ModelConfig, layer: int) -> dict[str, np.ndarray]:
    """Llama-style attention plus the router at `mlp.gate` (Qwen2/3-MoE, OLMoE)."""
    out = llama_style_attention(r, cfg, layer)
    out["router"] = linear(r, f"model.layers.{layer}.mlp.gate.weight", cfg.num_experts, cfg.hidden_size)
    return out


def mlp_expert(r, cfg: ModelConfig, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray]:
    """Expert `mlp.experts.{e}` with gate_proj / up_proj / down_proj (Qwen2/3-MoE, OLMoE)."""
    return gate_up_down(r, cfg, f"model.layers.{layer}.mlp.experts.{expert}")


def check_qwen_layout(hf: dict) -> None:
    """Qwen-MoE configs can make some layers dense or use sliding windows; msjax serves all-MoE stacks (one
    program per role) with full attention, and refuses the rest rather than computing something else."""
    step, dense = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
    if step != 1 or dense:
        raise ConfigError("mlp_only_layers" if dense else "decoder_sparse_step",
                          "dense MLP layers between MoE layers are not supported")
    if hf.get("use_sliding_window"):
        raise ConfigError("use_sliding_window", "sliding-window attention is not supported")
