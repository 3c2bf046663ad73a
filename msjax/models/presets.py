"""Named models: the embedded default `tiny-moe` (a trained HF checkpoint shipped in the package) and
config-only presets of the paper's models for planning and benchmarks.

Config-only presets have no weights. Their shapes come from `jax.eval_shape`; random weights are made only
when they fit in host memory, and `num_layers` cuts a real-width model to a few layers for benchmarks.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from msjax.config import ModelConfig, RopeConfig
from msjax.errors import ConfigError, ModelTooLargeError, UnknownArchitectureError

TINY_MOE_DIR = Path(__file__).parent / "tiny_moe"

_CONFIGS = {
    "mixtral-8x7b": ModelConfig(
        architecture="MixtralForCausalLM", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, expert_ffn_size=14336, rope=RopeConfig(1e6),
        norm_eps=1e-5, max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,)),
    "mixtral-8x22b": ModelConfig(
        architecture="MixtralForCausalLM", vocab_size=32768, hidden_size=6144, num_layers=56, num_heads=48,
        num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, expert_ffn_size=16384, rope=RopeConfig(1e6),
        norm_eps=1e-5, max_position_embeddings=65536, bos_token_id=1, eos_token_ids=(2,)),
    "dbrx": ModelConfig(
        architecture="DbrxForCausalLM", vocab_size=100352, hidden_size=6144, num_layers=40, num_heads=48,
        num_kv_heads=8, head_dim=128, num_experts=16, top_k=4, expert_ffn_size=10752, rope=RopeConfig(5e5),
        norm_kind="layernorm", norm_eps=1e-5, clip_qkv=8.0, max_position_embeddings=32768,
        eos_token_ids=(100257,)),
    # The paper's Table 4 "Scaled-MoE": Mixtral-like with more experts. Heads are not given there; 64 query and
    # 8 KV heads of 128 reproduce its 317B parameters.
    "scaled-moe": ModelConfig(
        architecture="MixtralForCausalLM", vocab_size=32000, hidden_size=8192, num_layers=48, num_heads=64,
        num_kv_heads=8, head_dim=128, num_experts=32, top_k=4, expert_ffn_size=8192, rope=RopeConfig(1e6),
        norm_eps=1e-5, max_position_embeddings=32768),
}


def preset_names() -> list[str]:
    return ["tiny-moe", *_CONFIGS]


def preset_config(name: str, *, num_layers: int | None = None) -> ModelConfig:
    """The config of a named model, optionally cut to `num_layers` layers."""
    if name == "tiny-moe":
        from msjax.models.families import read_config
        cfg = read_config(TINY_MOE_DIR)
    elif name in _CONFIGS:
        cfg = _CONFIGS[name]
    else:
        raise UnknownArchitectureError(name, preset_names(), what="preset")
    if num_layers is not None:
        if num_layers <= 0 or num_layers > cfg.num_layers:
            raise ConfigError("num_layers", f"must be in [1, {cfg.num_layers}] for {name}, got {num_layers}")
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    return cfg


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits_in_memory(name: str, cfg: ModelConfig, dtype, available: int | None = None) -> int:
    """Bytes the weights need; raises ModelTooLargeError when they exceed 80% of available host memory."""
    needed = cfg.param_count() * np.dtype(dtype).itemsize
    available = available_host_bytes() if available is None else available
    if needed > 0.8 * available:
        raise ModelTooLargeError(name, needed, available)
    return needed


def random_preset(name: str, *, num_layers: int | None = None, dtype=jnp.bfloat16, seed: int = 0):
    """A preset with random weights, as an `MoEModel` (checks the memory first)."""
    from msjax.models.programs import MoEModel
    cfg = preset_config(name, num_layers=num_layers)
    check_fits_in_memory(name, cfg, dtype)
    return MoEModel.random(cfg, seed=seed, dtype=dtype)


def abstract_roles(cfg: ModelConfig, dtype=jnp.bfloat16):
    """Both roles with `jax.ShapeDtypeStruct` leaves instead of arrays: shapes for planning, no memory."""
    from flax import nnx

    from msjax.models.modules import AttentionRole, ExpertRole
    return (nnx.eval_shape(lambda: AttentionRole(cfg, dtype=dtype, rngs=nnx.Rngs(0))),
            nnx.eval_shape(lambda: ExpertRole(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
