"""Small numerical building blocks shared by every family."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msjax.config import NormKind


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF's RMSNorm: normalise in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without bias (DBRX), statistics in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def norm(x: jax.Array, weight: jax.Array, kind: NormKind, eps: float) -> jax.Array:
    return rms_norm(x, weight, eps) if kind == "rms" else layer_norm(x, weight, eps)


def swiglu(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Dense SwiGLU MLP: x [t, h], w_gate_up [h, 2f] (gate half first), w_down [f, h]."""
    gate, up = jnp.split(jnp.dot(x, w_gate_up, preferred_element_type=jnp.float32), 2, axis=-1)
    return jnp.dot((jax.nn.silu(gate) * up).astype(x.dtype), w_down)


def route(router_logits: jax.Array, top_k: int, norm_p: float | None):
    """Softmax over all experts in float32, top-k, then divide by the p-norm of the chosen weights.

    Returns (topk_ids [t, k] int32, topk_weights [t, k] float32).
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_p is not None:
        if norm_p == 1.0:
            scale = jnp.sum(weights, axis=-1, keepdims=True)
        else:
            scale = jnp.sum(jnp.abs(weights) ** norm_p, axis=-1, keepdims=True) ** (1.0 / norm_p)
        weights = weights / scale
    return ids.astype(jnp.int32), weights
