"""Each layer's weights as their own arrays, for the nodes' per-layer programs.

The roles stack every layer's weights on a leading layer axis (`msjax.models.modules`). A program that indexes
that axis (with a constant, or a layer number it is given) makes XLA copy the layer's weights out of the stacked
array before using them: on this project's CPU machine those copies cost more than the expert matmuls, and in a
program that runs several layers XLA scheduled them all at the start, so its temporary memory held every
layer's weights a second time. `split_layers` does the slicing once, at load: layer l's state holds that
layer's weights as arrays with a leading axis of 1 (the same module code indexes them with layer 0, which XLA
reduces to nothing) and the shared weights (embeddings, final norm, LM head) as the same arrays in every layer's
state. One compiled layer program then serves every layer: it is called with layer l's state as its argument
(`msjax.runtime.layer_programs`).
"""

from __future__ import annotations

import jax
from flax import nnx


def _top_name(path) -> str:
    key = path[0]
    return str(getattr(key, "key", getattr(key, "name", key)))


def split_layers(state: nnx.State, num_layers: int, shared: tuple[str, ...] = ()) -> tuple[nnx.State, ...]:
    """state with per-layer leaves [num_layers, ...] -> num_layers states with those leaves [1, ...] (copies,
    taken once; the caller drops `state` to keep memory flat). Leaves under the attributes named in `shared`
    are not per layer and appear unsliced (the same arrays) in every layer's state. Call the role with
    `layers[l]` and layer index 0."""
    def check(path, x):
        if _top_name(path) not in shared and (x.ndim == 0 or x.shape[0] != num_layers):
            raise ValueError(f"split_layers: {jax.tree_util.keystr(path)} has shape {x.shape}, not a leading "
                             f"axis of {num_layers} layers (name it in `shared` if it is not per layer)")
    jax.tree_util.tree_map_with_path(check, state)
    return tuple(jax.tree_util.tree_map_with_path(
        lambda path, x, layer=layer: x if _top_name(path) in shared else x[layer:layer + 1], state)
        for layer in range(num_layers))

