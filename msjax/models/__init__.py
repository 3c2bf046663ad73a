"""Model code: one forward pass split into the attention role and the expert role. (Loading a model by name or
path: `msjax.loading`.)"""

from __future__ import annotations

from msjax.models.presets import preset_config, preset_names
from msjax.models.programs import MoEModel

__all__ = ["MoEModel", "preset_config", "preset_names"]
