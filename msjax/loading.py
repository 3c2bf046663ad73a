"""A model by name: an HF checkpoint directory, the embedded `tiny-moe`, or a config-only preset (random
weights). What the CLI, the engine and the server load through."""

from __future__ import annotations

import os

import jax.numpy as jnp

from msjax.models.presets import TINY_MOE_DIR, preset_config, random_preset
from msjax.models.programs import MoEModel


def resolve_model_path(model: str) -> str | None:
    """An HF directory for `model` (a path, or the embedded `tiny-moe`), or None for a config-only preset."""
    if os.path.isdir(model):
        return model
    if model == "tiny-moe":
        return str(TINY_MOE_DIR)
    preset_config(model)  # raises for an unknown name
    return None


def load(model: str, *, dtype=jnp.float32, num_layers: int | None = None, seed: int = 0, progress=None) -> MoEModel:
    """An HF checkpoint directory or a preset name as a colocated model (random weights for config-only
    presets, checked against host memory). `progress(bytes_read, total_bytes)` follows checkpoint reads."""
    from msjax.checkpoint import load_model
    path = resolve_model_path(model)
    if path is None:
        return random_preset(model, num_layers=num_layers, dtype=dtype, seed=seed)
    if num_layers is not None:
        raise ValueError("num_layers applies to config-only presets, not to checkpoints")
    return load_model(path, dtype=dtype, progress=progress)


__all__ = ["load", "resolve_model_path"]
