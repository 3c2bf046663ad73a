"""Exception types of msjax. Each names what is wrong, so a user can fix the input without reading code.

All input errors derive from `ValueError` so callers that only know the standard library still catch them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing or invalid. `field` names it (e.g. "num_experts")."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class UnknownArchitectureError(ConfigError):
    """The checkpoint's architecture or a preset name is not one msjax implements."""

    def __init__(self, name: str, known: list[str], what: str = "architecture"):
        self.name = name
        super().__init__(what, f"unknown {what} {name!r}; supported: {', '.join(sorted(known))}")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or holds a tensor that does not fit the config."""


class ModelTooLargeError(MemoryError):
    """Random weights for a preset would not fit in host memory; says how many bytes were needed."""

    def __init__(self, name: str, needed_bytes: int, available_bytes: int):
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        super().__init__(
            f"{name}: random weights need {needed_bytes / 2**30:.1f} GiB but only "
            f"{available_bytes / 2**30:.1f} GiB of host memory is available; use num_layers=... to cut the "
            f"model to a few layers, or jax.eval_shape for shapes only"
        )
