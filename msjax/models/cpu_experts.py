"""The expert FFN on CPU through the native grouped matmul (ffi/cpu/grouped_matmul.cc), an XLA FFI custom call.

XLA:CPU has no grouped matmul that reads only the experts a step routes to: its `ragged_dot` copies the weights
transposed on every call, the dense form (`pallas_kernels.grouped_gemm.grouped_gemm_dense`) multiplies every
row by every expert, and slicing one layer out of stacked weights inside a layer loop copies that layer. The
custom call takes the stacked weights and the layer as operands and streams each expert that has rows once per
block of 8 rows: a batch-1 decode step reads the top-k experts' weights and no others.

Same numbers as `pallas_kernels.grouped_gemm.grouped_ffn_reference` (float32 accumulation; the gate/up product
kept in float32 before SwiGLU), to float32 rounding. Used by `ExpertRole` with kernels="auto" on the CPU
backend when the native library is built; forward only (training differentiates the reference path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TARGET = "msjax_grouped_matmul_cpu"
_registered = False


def available() -> bool:
    """Whether the custom call can be used: the native library is built (tools/setup.sh builds it)."""
    global _registered
    if _registered:
        return True
    from msjax.comm._lib import LibraryNotBuilt, library
    try:
        lib = library()
    except LibraryNotBuilt:
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GroupedMatmulCpu), platform="cpu")
    _registered = True
    return True


def grouped_matmul(x: jax.Array,  # [rows, k], sorted by group
                   w: jax.Array,  # [layers, groups, k, n]
                   layer,  # int32 [] or int: which of w's layers
                   group_sizes: jax.Array,  # [groups] int32
                   out_dtype=None) -> jax.Array:  # [rows, n]
    """Row i of the result is x[i] @ w[layer, g(i)]; rows past sum(group_sizes) are zero."""
    if not available():
        raise RuntimeError("the native library is not built: run bash tools/setup.sh")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[3]), jnp.dtype(out_dtype or x.dtype))
    return jax.ffi.ffi_call(TARGET, out)(x, w.astype(x.dtype), jnp.asarray(layer, jnp.int32),
                                         group_sizes.astype(jnp.int32))


def grouped_ffn(x: jax.Array,  # [rows, hidden], sorted by expert
                group_sizes: jax.Array,  # [experts] int32
                w_gate_up: jax.Array,  # [layers, experts, hidden, 2 * ffn]: gate half first, then up
                w_down: jax.Array,  # [layers, experts, ffn, hidden]
                layer) -> jax.Array:  # [rows, hidden]
    """SwiGLU experts of layer `layer`: down(silu(x @ gate) * (x @ up)); padding rows are zero."""
    gate_up = grouped_matmul(x, w_gate_up, layer, group_sizes, out_dtype=jnp.float32)
    gate, up = jnp.split(gate_up, 2, axis=-1)  # [rows, ffn] each
    act = (jax.nn.silu(gate) * up).astype(x.dtype)
    return grouped_matmul(act, w_down, layer, group_sizes)


__all__ = ["available", "grouped_ffn", "grouped_matmul"]
