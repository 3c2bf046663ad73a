"""One module per HF architecture: how its config.json and tensor names map onto the shared model.

Each family module provides `ARCHITECTURES`, `config_from_hf(hf) -> ModelConfig`, and three tensor functions
that the loader calls with a `TensorReader`: `global_tensors(r, cfg)`, `attention_tensors(r, cfg, layer)` and
`expert_tensors(r, cfg, layer, expert) -> (w_gate_up [hidden, 2*ffn], w_down [ffn, hidden])`. Weights come
out in msjax's layout ([in, out] matrices); the forward code is shared and knows no family.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

from msjax.config import ModelConfig
from msjax.errors import CheckpointError, ConfigError, UnknownArchitectureError
from msjax.models.families import dbrx, mixtral, olmoe, qwen2_moe, qwen3_moe

_FAMILIES: dict[str, ModuleType] = {
    arch: module for module in (mixtral, qwen2_moe, qwen3_moe, olmoe, dbrx) for arch in module.ARCHITECTURES
}


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)


def family_for_config(config: dict | ModelConfig) -> ModuleType:
    """The family module for an HF config dict (its `architectures`) or a ModelConfig."""
    if isinstance(config, ModelConfig):
        arch = config.architecture
    else:
        archs = config.get("architectures")
        if not archs or not isinstance(archs, list):
            raise ConfigError("architectures", "config.json names no architecture (expected e.g. "
                              "[\"MixtralForCausalLM\"])")
        arch = archs[0]
    if arch not in _FAMILIES:
        raise UnknownArchitectureError(arch, supported_architectures())
    return _FAMILIES[arch]


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Parse `config.json` of an HF checkpoint directory into a ModelConfig through its family."""
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: no config.json (is this an HF checkpoint directory?)")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("config.json", f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise ConfigError("config.json", f"{config_path} must hold a JSON object")
    return family_for_config(hf).config_from_hf(hf)
