"""Per-layer weight states (`msjax.models.layer_states.split_layers`): the same numbers as the stacked weights,
and node layer programs that hold no copy of a layer's weights."""

from __future__ import annotations

import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax.comm import native
from flax import nnx

from msjax.comm.m2n import Packet
from msjax.kv_cache import AttentionBatch, KVCache
from msjax.models.layer_states import split_layers
from msjax.models.modules import AttentionRole
from msjax.models.programs import MoEModel
from msjax.runtime.layer_programs import run_experts
from tests.model_utils import shuffled_page_table, tiny_config


@pytest.fixture(scope="module")
def model():
    return MoEModel.random(tiny_config(num_layers=3), seed=0)


def test_each_layer_gets_its_own_slice_and_the_shared_weights_stay_one_array(model):
    layers = split_layers(model.attention_state, 3, AttentionRole.SHARED_PARAMS)
    assert len(layers) == 3
    wq = np.asarray(model.attention_state["wq"][...])  # [layers, hidden, q]
    for layer, state in enumerate(layers):
        np.testing.assert_array_equal(np.asarray(state["wq"][...]), wq[layer:layer + 1])
        assert state["embed"][...] is model.attention_state["embed"][...]  # not copied per layer
        assert state["final_norm"][...].shape == (model.cfg.hidden_size,)
    experts = split_layers(model.expert_state, 3)
    assert all(leaf.shape[0] == 1 for state in experts for leaf in jax.tree.leaves(state))


def test_a_weight_without_the_layer_axis_is_named_in_the_error(model):
    with pytest.raises(ValueError, match=r"embed.*leading axis of 3 layers"):
        split_layers(model.attention_state, 3)  # embed and final_norm are not per layer


def test_roles_compute_the_same_from_one_layer_as_from_the_stack(model):
    cfg = model.cfg
    b, page_size = 4, 8
    table = jnp.asarray(shuffled_page_table(b, 2))
    batch = AttentionBatch(jnp.array([3, 0, 7, 5], jnp.int32), jnp.arange(b, dtype=jnp.int32), table)
    h = jnp.asarray(np.random.default_rng(1).standard_normal((b, cfg.hidden_size)), jnp.float32)
    layers_a = split_layers(model.attention_state, cfg.num_layers, AttentionRole.SHARED_PARAMS)
    layers_e = split_layers(model.expert_state, cfg.num_layers)
    layer = jnp.int32(2)  # not 0: the KV cache is still written at the real layer
    rows = jnp.asarray(np.random.default_rng(2).standard_normal((6, cfg.hidden_size)), jnp.float32)
    packet = Packet(rows=rows, expert_ids=jnp.array([0, 0, 1, 3, 4, 5], jnp.int32), count=jnp.int32(5))

    def run(state_a, state_e):
        kv = KVCache.create(cfg, 2 * b, page_size)
        h2, x, ids, weights, kv = nnx.merge(model.attention_def, state_a)(layer, h, batch, kv, decode=True)
        out = run_experts(model.expert_def, state_e, layer, (packet,))[0]
        return np.asarray(h2), np.asarray(x), np.asarray(weights), np.asarray(out), np.asarray(kv.k)

    for stacked, split in zip(run(model.attention_state, model.expert_state), run(layers_a[2], layers_e[2])):
        np.testing.assert_allclose(split, stacked, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not native.is_built(), reason="native M2N library not built")
def test_the_expert_layer_program_holds_no_copy_of_a_layers_weights():
    """The expert node's layer program, given one layer's weights as their own arrays, has temporaries of
    activations only: less than one layer's expert weights (a program that sliced a layer out of the stacked
    array copied it first)."""
    from msjax.comm.wire import row_bytes
    from msjax.runtime.layer_programs import ExpertPrograms
    cfg = tiny_config(num_layers=3, hidden_size=64, expert_ffn_size=128, num_experts=4)
    model = MoEModel.random(cfg, seed=0)
    layers = split_layers(model.expert_state, cfg.num_layers)
    layer_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(layers[0]))
    cap = 8
    channel = f"t{uuid.uuid4().hex[:10]}"
    dispatch_bytes, back_bytes = cap * row_bytes(cfg.hidden_size, jnp.float32), cap * cfg.hidden_size * 4
    with native.Receiver("shm", f"{channel}-d", 0, 1, dispatch_bytes) as rx, \
            native.Receiver("shm", f"{channel}-b", 0, 1, back_bytes) as back_rx, \
            native.Sender("shm", [back_rx.address], 0, back_bytes) as back:
        programs = ExpertPrograms(cfg, model.expert_def, tuple(range(4)), rx, back, jnp.float32)
        compiled = programs.layer.lower(layers[1], jnp.int32(1), jnp.zeros((), jnp.int32),
                                        rounds=(((0, cap),),) * 2).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < layer_bytes
