"""Rotary position embeddings with HF's frequency scalings (default, linear, llama3, yarn).

The inverse frequencies are computed on the host in float32 in the same order of operations as
transformers' `modeling_rope_utils`, so positions rotate exactly as the checkpoint was trained.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from msjax.config import RopeConfig


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:  # [dim // 2] float32
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def _yarn(rope: RopeConfig, dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    original = rope.original_max_position_embeddings or max_positions

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_factor = (1 - ramp).astype(np.float32)
    pos_freqs = np.float32(rope.theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    inv_extrapolation = (1.0 / pos_freqs).astype(np.float32)
    inv_interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv_freq = inv_interpolation * (1 - extrapolation_factor) + inv_extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(rope: RopeConfig, dim: int) -> np.ndarray:
    inv_freq = _default_inv_freq(rope.theta, dim)
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_frequencies(rope: RopeConfig, head_dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim // 2] and the factor that scales cos and sin (yarn's mscale, else 1)."""
    if rope.kind == "default":
        return _default_inv_freq(rope.theta, head_dim), 1.0
    if rope.kind == "linear":
        return (_default_inv_freq(rope.theta, head_dim) / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.kind == "llama3":
        return _llama3(rope, head_dim), 1.0
    return _yarn(rope, head_dim, max_positions)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, attention_factor: float):
    """cos, sin [tokens, head_dim] for integer positions [tokens] (negative positions are padding)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [t, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [tokens, heads, head_dim] rotated in HF's half-split layout (rotate_half, not interleaved)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x.astype(jnp.float32) * cos[:, None, :] + rotated.astype(jnp.float32) * sin[:, None, :]
    return out.astype(x.dtype)
