"""Config-only presets: shapes without memory, a clear error when random weights would not fit, layer cuts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msjax.errors import ModelTooLargeError, UnknownArchitectureError
from msjax.loading import load
from msjax.models.presets import abstract_roles, check_fits_in_memory, preset_config


def _bytes(module) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(module)))


@pytest.mark.parametrize("name", ["mixtral-8x7b", "mixtral-8x22b", "dbrx", "scaled-moe"])
def test_shapes_without_memory(name):
    cfg = preset_config(name)
    attention, experts = abstract_roles(cfg)
    assert experts.w_gate_up.shape == (cfg.num_layers, cfg.num_experts, cfg.hidden_size,
                                             2 * cfg.expert_ffn_size)
    assert attention.wq.shape == (cfg.num_layers, cfg.hidden_size, cfg.num_heads * cfg.head_dim)
    assert _bytes(attention) + _bytes(experts) == cfg.param_count() * 2  # bf16


def test_too_large_for_memory_names_the_bytes():
    with pytest.raises(ModelTooLargeError, match=r"mixtral-8x22b: random weights need 261\.9 GiB"):
        check_fits_in_memory("mixtral-8x22b", preset_config("mixtral-8x22b"), jnp.bfloat16, available=24 * 2**30)
    with pytest.raises(MemoryError, match="num_layers"):
        load("scaled-moe")  # 634 GB of bf16 on any machine that runs this


def test_unknown_preset():
    with pytest.raises(UnknownArchitectureError, match="preset 'mixtral-9x9b'"):
        load("mixtral-9x9b")
