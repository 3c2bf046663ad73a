"""The CPU expert matmul custom call (ffi/cpu/grouped_matmul.cc) against the XLA references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax.models import cpu_experts
from pallas_kernels.grouped_gemm import grouped_ffn_reference, grouped_gemm_reference

pytestmark = pytest.mark.skipif(not cpu_experts.available(), reason="native library not built (tools/setup.sh)")


def _case(sizes, rows, k, n, layers=3, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    w = jnp.asarray(rng.standard_normal((layers, len(sizes), k, n)) / np.sqrt(k), dtype)
    return x, w, jnp.asarray(sizes, jnp.int32)


# groups empty, of one row, of more rows than a row block (8), and padding rows after the groups; n past one
# column block (512) and not a multiple of it
@pytest.mark.parametrize("sizes,rows,k,n", [
    ([1, 0, 1, 1], 3, 16, 8),
    ([0, 9, 0, 3, 17], 32, 24, 40),
    ([2, 0, 0, 5], 12, 40, 700),
    ([0, 0, 0], 4, 8, 8),
])
def test_matches_the_reference_for_every_layer(sizes, rows, k, n):
    x, w, gs = _case(sizes, rows, k, n)
    run = jax.jit(cpu_experts.grouped_matmul)
    for layer in range(w.shape[0]):
        got = run(x, w, layer, gs)
        want = grouped_gemm_reference(x, w[layer], gs)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert not np.any(np.asarray(got)[sum(sizes):]), "padding rows must be zero"


def test_bfloat16_in_float32_out_matches_the_reference():
    x, w, gs = _case([3, 0, 6], 10, 32, 48, dtype=jnp.bfloat16)
    got = jax.jit(cpu_experts.grouped_matmul, static_argnames="out_dtype")(x, w, 1, gs, out_dtype=jnp.float32)
    assert got.dtype == jnp.float32
    want = grouped_gemm_reference(x, w[1], gs, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got16 = jax.jit(cpu_experts.grouped_matmul)(x, w, 1, gs)
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got16, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32),
                               rtol=1e-2, atol=1e-2)


def test_ffn_matches_the_reference_with_a_traced_layer():
    rng = np.random.default_rng(1)
    sizes, rows, h, f = [2, 0, 3, 1], 8, 32, 24
    x = jnp.asarray(rng.standard_normal((rows, h)), jnp.float32)
    w_gate_up = jnp.asarray(rng.standard_normal((2, 4, h, 2 * f)) / np.sqrt(h), jnp.float32)
    w_down = jnp.asarray(rng.standard_normal((2, 4, f, h)) / np.sqrt(f), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    got = jax.jit(cpu_experts.grouped_ffn)(x, gs, w_gate_up, w_down, jnp.int32(1))
    want = grouped_ffn_reference(x, gs, w_gate_up[1], w_down[1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_group_sizes_and_layer_are_refused_with_a_clear_error():
    x, w, _ = _case([1, 1], 2, 8, 8)
    with pytest.raises(Exception, match="group_sizes must be >= 0 and sum to at most the 2 rows"):
        jax.block_until_ready(cpu_experts.grouped_matmul(x, w, 0, jnp.asarray([2, 1], jnp.int32)))
    with pytest.raises(Exception, match=r"layer 3 not in \[0, 3\)"):
        jax.block_until_ready(cpu_experts.grouped_matmul(x, w, 3, jnp.asarray([1, 1], jnp.int32)))


def test_the_expert_role_uses_it_on_cpu():
    """kernels="auto" on the CPU lowers to the custom call, with the stacked weights (no layer slice)."""
    from flax import nnx

    from msjax.config import ModelConfig
    from msjax.models.modules import ExpertRole
    cfg = ModelConfig(architecture="MixtralForCausalLM", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8, num_experts=4, top_k=2, expert_ffn_size=8)
    experts = ExpertRole(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(experts)
    x, gs = jnp.ones((4, 16)), jnp.asarray([1, 2, 0, 1], jnp.int32)

    def run(state, layer):
        return nnx.merge(graphdef, state)(layer, x, gs)

    text = jax.jit(run).lower(state, jnp.int32(1)).as_text()
    assert cpu_experts.TARGET in text
    reference = nnx.merge(graphdef, state)
    reference.kernels = "reference"
    np.testing.assert_allclose(jax.jit(run)(state, jnp.int32(1)), reference(1, x, gs), rtol=1e-5, atol=1e-5)


def test_layer_matmul_reads_stacked_weights_in_place_for_few_rows():
    """Attention projections at decode: x @ w[layer] through the custom call, same numbers as the XLA dot; many
    rows (prefill) and one-layer states keep the dot."""
    from flax import nnx

    from msjax.models.modules import SMALL_MATMUL_ROWS, _layer_matmul
    rng = np.random.default_rng(2)
    w = nnx.Param(jnp.asarray(rng.standard_normal((3, 24, 40)), jnp.float32))
    for rows in (2, SMALL_MATMUL_ROWS, SMALL_MATMUL_ROWS + 1):
        x = jnp.asarray(rng.standard_normal((rows, 24)), jnp.float32)
        fn = jax.jit(lambda x, layer: _layer_matmul(x, w, layer, "auto"))
        text = fn.lower(x, jnp.int32(2)).as_text()
        assert (cpu_experts.TARGET in text) == (rows <= SMALL_MATMUL_ROWS)
        np.testing.assert_allclose(fn(x, jnp.int32(2)), x @ w[...][2], rtol=1e-5, atol=1e-5)
    one = nnx.Param(w[...][:1])
    assert cpu_experts.TARGET not in jax.jit(lambda x: _layer_matmul(x, one, 0, "auto")).lower(x[:2]).as_text()
