"""One forward, two roles: the roles composed layer by layer with dispatch/combine between them give the
colocated model, the paged cache and padding behave, and dispatch/combine handle routing extremes. (The nodes'
own layer programs are tested against the colocated model through every plan: test_disaggregated.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax.kv_cache import AttentionBatch, KVCache
from msjax.models.moe import combine, dispatch
from flax import nnx

from msjax.models.programs import MoEModel
from tests.model_utils import decode_token_by_token, prefill_batch, shuffled_page_table, tiny_config


@pytest.fixture(scope="module")
def model():
    return MoEModel.random(tiny_config(qk_norm="head", qkv_bias=True), seed=3)


def _layer_by_layer(model, tokens, batch, kv):
    """The model as the disaggregated deployment runs it: each role on its own, dispatch/combine between."""
    cfg = model.cfg
    attention, experts = nnx.merge(model.attention_def, model.attention_state), nnx.merge(model.expert_def,
                                                                                          model.expert_state)
    h = attention.embed_tokens(tokens)
    valid = batch.positions >= 0
    for layer in range(cfg.num_layers):
        h, x, ids, weights, kv = attention(jnp.int32(layer), h, batch, kv, decode=False)
        d = dispatch(x, ids, cfg.num_experts, valid)
        rows = experts(jnp.int32(layer), d.rows, d.group_sizes)
        h = h + combine(rows, d.order, weights)
    return attention.logits(h), kv


@pytest.mark.slow  # full suite only: the quick subset stays under 5 minutes
def test_roles_compose_to_colocated(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    table = shuffled_page_table(2, 3)
    tokens, batch = prefill_batch(prompts, table)
    rows = jnp.arange(tokens.shape[0])
    want, _ = model.forward(tokens, batch, KVCache.create(model.cfg, 6, 4), rows, decode=False)
    got, _ = _layer_by_layer(model, tokens, batch, KVCache.create(model.cfg, 6, 4))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_decode_through_cache_matches_prefill(model):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    tokens, batch = prefill_batch([prompt], shuffled_page_table(1, 3, seed=1))
    full, _ = model.forward(tokens, batch, KVCache.create(model.cfg, 3, 4), jnp.arange(len(prompt)), decode=False)
    stepwise = decode_token_by_token(model, prompt, page_size=4, seed=2)
    np.testing.assert_allclose(stepwise, np.asarray(full), rtol=1e-5, atol=1e-5)


def test_padding_tokens_change_nothing(model):
    prompt = [5, 6, 7, 8, 9]
    table = shuffled_page_table(1, 2)
    tokens, batch = prefill_batch([prompt], table)
    want, _ = model.forward(tokens, batch, KVCache.create(model.cfg, 2, 4), jnp.arange(5), decode=False)
    padded = AttentionBatch(jnp.concatenate([batch.positions, jnp.full(3, -1, jnp.int32)]),
                            jnp.concatenate([batch.seq_ids, jnp.zeros(3, jnp.int32)]), batch.page_table)
    got, kv = model.forward(jnp.concatenate([tokens, jnp.array([1, 2, 3], jnp.int32)]), padded,
                            KVCache.create(model.cfg, 2, 4), jnp.arange(5), decode=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_dispatch_all_tokens_to_one_expert_and_empty_experts():
    x = jnp.arange(12.0).reshape(4, 3)
    ids = jnp.array([[2, 2], [2, 2], [2, 2], [2, 2]], jnp.int32)
    d = dispatch(x, ids, num_experts=5)
    assert d.group_sizes.tolist() == [0, 0, 8, 0, 0]
    weights = jnp.full((4, 2), 0.5)
    np.testing.assert_allclose(np.asarray(combine(d.rows, d.order, weights)), np.asarray(x))


def test_dispatch_excludes_padding_tokens():
    x = jax.random.normal(jax.random.key(0), (5, 4))
    ids = jnp.array([[0, 1], [1, 2], [0, 2], [1, 0], [2, 1]], jnp.int32)
    valid = jnp.array([True, True, False, True, False])
    d = dispatch(x, ids, 3, valid)
    assert int(d.group_sizes.sum()) == 6  # 3 valid tokens x top-2
    assert d.group_sizes.tolist() == [2, 3, 1]
    # rows are sorted by expert: each row equals the token it came from
    for r, a in enumerate(np.asarray(d.order)[:6]):
        np.testing.assert_array_equal(np.asarray(d.rows[r]), np.asarray(x[a // 2]))


@pytest.mark.slow  # ~30 s of interpreted kernels; the kernels' own interpret tests stay in the quick subset
def test_decode_through_the_pallas_kernels_in_interpret_mode():
    """The model's decode path through both Mosaic GPU kernels (paged attention, grouped expert FFN; interpreted on
    CPU) matches the references."""
    cfg = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=64, num_layers=2, expert_ffn_size=128)
    model = MoEModel.random(cfg, seed=1, dtype=jnp.bfloat16)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    want = decode_token_by_token(model.with_kernels("reference"), prompt, page_size=8)
    got = decode_token_by_token(model.with_kernels("interpret"), prompt, page_size=8)
    # bf16 weights and KV through different reduction orders: within 2% of the logits' scale (seen: 0.5%)
    assert np.max(np.abs(got - want)) <= 2e-2 * np.max(np.abs(want))
