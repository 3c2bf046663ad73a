"""HF checkpoint directories that benchmarks load on both sides (msjax and the HF peer), by name.

    tiny-moe    the embedded trained checkpoint (msjax/models/tiny_moe)
    olmoe-2l    OLMoE-1B-7B's dimensions (hidden 2048, 16 heads of 128 without GQA, 64 experts top-8 of width
                1024, vocab 50304), cut to 2 layers; random weights (normal, std 0.02; norms 1), float32,
                written once under ~/.cache/msjax/models/ (about 4.2 GB) in the per-expert layout OLMoE's
                checkpoints use, which both msjax and transformers (4.x and 5.x) read

`model_dir(name)` writes a random one on first use; the seed is fixed, so every machine gets the same weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = Path(os.environ.get("MSJAX_BENCH_MODELS", Path.home() / ".cache" / "msjax" / "models"))

OLMOE_2L = {
    "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048,
    "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 16,
    "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "clip_qkv": None,
    "hidden_act": "silu", "max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None,
    "rms_norm_eps": 1e-5, "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
    "initializer_range": 0.02, "router_aux_loss_coef": 0.01, "output_router_logits": False, "use_cache": True,
    "pad_token_id": 1, "eos_token_id": 50279, "dtype": "float32",
}
RANDOM = {"olmoe-2l": OLMOE_2L}


def model_dir(name: str) -> Path:
    """The HF directory of benchmark model `name` (a random one is written on first use)."""
    if name == "tiny-moe":
        from msjax.models.presets import TINY_MOE_DIR
        return TINY_MOE_DIR
    if name not in RANDOM:
        if Path(name).is_dir():
            return Path(name)
        raise SystemExit(f"unknown benchmark model {name!r}: tiny-moe, {', '.join(RANDOM)} or an HF directory")
    path = CACHE / f"{name}-seed0"
    if not (path / "model.safetensors").exists():
        write_random_olmoe(RANDOM[name], path)
    return path


def write_random_olmoe(cfg: dict, path: Path, seed: int = 0) -> None:
    """Random OLMoE weights under HF's tensor names (float32), then config.json and generation_config.json."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * (h // cfg["num_attention_heads"])
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])

    def normal(*shape):
        return (cfg["initializer_range"] * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": normal(v, h), "lm_head.weight": normal(v, h),
               "model.norm.weight": np.ones(h, np.float32)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors.update({
            f"{p}.input_layernorm.weight": np.ones(h, np.float32),
            f"{p}.post_attention_layernorm.weight": np.ones(h, np.float32),
            f"{p}.self_attn.q_proj.weight": normal(q, h), f"{p}.self_attn.k_proj.weight": normal(kv, h),
            f"{p}.self_attn.v_proj.weight": normal(kv, h), f"{p}.self_attn.o_proj.weight": normal(h, q),
            f"{p}.self_attn.q_norm.weight": np.ones(q, np.float32),
            f"{p}.self_attn.k_norm.weight": np.ones(kv, np.float32),
            f"{p}.mlp.gate.weight": normal(cfg["num_experts"], h)})
        for e in range(cfg["num_experts"]):
            tensors.update({f"{p}.mlp.experts.{e}.gate_proj.weight": normal(f, h),
                            f"{p}.mlp.experts.{e}.up_proj.weight": normal(f, h),
                            f"{p}.mlp.experts.{e}.down_proj.weight": normal(h, f)})
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.safetensors.partial"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"]}) + "\n")
    tmp.rename(path / "model.safetensors")  # last: a directory with model.safetensors is complete


def weight_bytes_read_per_token(cfg, context: int, dtype_bytes: int) -> int:
    """Bytes a batch-1 decode step must read at `context` tokens (msjax ModelConfig `cfg`): every layer's
    attention weights (projections, norms, router), the weights of the top_k experts the token is routed to,
    its embedding row, the final norm and LM head, and the K and V of `context` positions in every layer."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    attention = h * q + 2 * h * kv + q * h + 2 * h + q + kv + cfg.num_experts * h  # wq wk wv wo, norms, router
    experts = cfg.top_k * 3 * h * cfg.expert_ffn_size
    cache = context * 2 * kv
    per_layer = attention + experts + cache
    return dtype_bytes * (cfg.num_layers * per_layer + h + h + cfg.vocab_size * h)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second numpy copies a `nbytes` array into another (best of `repeats`): what one decode step
    could at best stream, as the roofline's denominator."""
    import time
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best
