"""HF checkpoints (config.json + safetensors, single or sharded) into the model's roles.

Loading is per role: an attention node reads only the attention side's tensors, an expert node only the tensors
of its experts (for fused expert tensors, only its rows). `TensorReader` records what was read, which the tests
use to prove it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from msjax.config import ModelConfig
from msjax.errors import CheckpointError, ConfigError
from msjax.models.families import family_for_config, read_config
from msjax.models.modules import AttentionRole, ExpertRole
from msjax.safetensors_file import SafetensorsFile

__all__ = ["TensorReader", "load_attention_role", "load_expert_role", "load_model", "read_config"]


class TensorReader:
    """Tensors of an HF checkpoint directory by name, checked against the shape the family expects."""

    def __init__(self, path: str | os.PathLike, progress: Callable[[int, int], None] | None = None):
        """`progress(bytes_read, total_bytes)` is called after every read (e.g. to draw a progress bar)."""
        self.path = Path(path)
        self.names_read: list[str] = []
        self.bytes_read = 0
        self._progress = progress
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json found")
            weight_map = None
        self._files = {}
        for name in files:
            if not (self.path / name).exists():
                raise CheckpointError(f"{self.path}: shard {name} named in the index is missing")
            self._files[name] = SafetensorsFile(self.path / name)
        if weight_map is None:
            weight_map = {t: f for f, sf in self._files.items() for t in sf.names()}
        self._where = weight_map
        self.total_bytes = sum(e[3] - e[2] for sf in self._files.values() for e in sf.entries.values())

    def has(self, name: str) -> bool:
        return name in self._where

    def _file(self, name: str, shape: tuple[int, ...]) -> SafetensorsFile:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing (expected shape {shape})")
        sf = self._files[self._where[name]]
        if name not in sf.entries:
            raise CheckpointError(f"{sf.path}: tensor {name!r} is listed in the index but not in this shard")
        if sf.shape(name) != tuple(shape):
            raise CheckpointError(f"{sf.path}: tensor {name!r} has shape {sf.shape(name)}, expected {tuple(shape)}")
        return sf

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The whole tensor; `shape` is what the config implies (a mismatch is an error naming both)."""
        out = self._file(name, shape).read(name)
        self._record(name, out)
        return out

    def get_rows(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> np.ndarray:
        """Rows [start:stop] of a tensor of full shape `shape`, reading only those bytes."""
        out = self._file(name, shape).read(name, slice(start, stop))
        self._record(f"{name}[{start}:{stop}]", out)
        return out

    def _record(self, name: str, array: np.ndarray) -> None:
        self.names_read.append(name)
        self.bytes_read += array.nbytes
        if self._progress is not None:
            self._progress(self.bytes_read, self.total_bytes)


def _fill(module: nnx.Module, layers: int, per_layer: Callable[[int], dict[str, np.ndarray]],
          fixed: dict[str, np.ndarray], dtype, what: str) -> None:
    """Put weights into an abstract module: `fixed` as they are, `per_layer(l)` stacked over layers."""
    targets = {name: var for name, var in vars(module).items() if isinstance(var, nnx.Variable)}
    stacked: dict[str, np.ndarray] = {}

    def place(name: str, value: np.ndarray, index) -> None:
        if name not in targets:
            raise CheckpointError(f"{what}: the family produced an unknown weight {name!r}")
        expected = targets[name].shape if index is None else targets[name].shape[1:]
        if tuple(value.shape) != tuple(expected):
            raise CheckpointError(f"{what}: weight {name!r} has shape {tuple(value.shape)} after conversion, "
                                  f"expected {tuple(expected)}")
        if index is None:
            stacked[name] = value
        else:
            if name not in stacked:
                stacked[name] = np.empty(targets[name].shape, dtype=np.dtype(dtype))
            stacked[name][index] = value

    for name, value in fixed.items():
        place(name, value, None)
    for layer in range(layers):
        for name, value in per_layer(layer).items():
            place(name, value, layer)
    missing = set(targets) - set(stacked)
    if missing:
        raise CheckpointError(f"{what}: no weights for {sorted(missing)}")
    for name, value in stacked.items():
        targets[name].set_value(jnp.asarray(value, dtype=dtype))


def load_attention_role(path: str | os.PathLike, cfg: ModelConfig | None = None, *, dtype=jnp.float32,
                        reader: TensorReader | None = None) -> AttentionRole:
    """The attention side of a checkpoint: embeddings, attention, router, shared expert, norms, LM head."""
    cfg = cfg or read_config(path)
    reader = reader or TensorReader(path)
    family = family_for_config(cfg)
    module = nnx.eval_shape(lambda: AttentionRole(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    _fill(module, cfg.num_layers, lambda layer: family.attention_tensors(reader, cfg, layer),
          family.global_tensors(reader, cfg), dtype, f"{path} (attention)")
    return module


def load_expert_role(path: str | os.PathLike, cfg: ModelConfig | None = None, *,
                     expert_ids: Iterable[int] | None = None, dtype=jnp.float32,
                     reader: TensorReader | None = None) -> ExpertRole:
    """The routed experts `expert_ids` (default: all) of a checkpoint, reading no other tensor."""
    cfg = cfg or read_config(path)
    reader = reader or TensorReader(path)
    family = family_for_config(cfg)
    ids = tuple(range(cfg.num_experts)) if expert_ids is None else tuple(expert_ids)
    for e in ids:
        if not 0 <= e < cfg.num_experts:
            raise ConfigError("expert_ids", f"expert {e} is outside [0, {cfg.num_experts})")
    module = nnx.eval_shape(lambda: ExpertRole(cfg, expert_ids=ids, dtype=dtype, rngs=nnx.Rngs(0)))

    def per_layer(layer: int) -> dict[str, np.ndarray]:
        pairs = [family.expert_tensors(reader, cfg, layer, e) for e in ids]
        return {"w_gate_up": np.stack([p[0] for p in pairs]), "w_down": np.stack([p[1] for p in pairs])}

    _fill(module, cfg.num_layers, per_layer, {}, dtype, f"{path} (experts {list(ids)})")
    return module


def load_model(path: str | os.PathLike, *, dtype=jnp.float32, progress: Callable[[int, int], None] | None = None):
    """Both roles of an HF checkpoint directory as a colocated `MoEModel`."""
    from msjax.models.programs import MoEModel
    cfg = read_config(path)
    reader = TensorReader(path, progress)
    return MoEModel.from_modules(load_attention_role(path, cfg, dtype=dtype, reader=reader),
                                 load_expert_role(path, cfg, dtype=dtype, reader=reader))
