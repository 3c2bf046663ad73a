"""What the kernels need of the device: one answer for every kernel and for the deployment's checks."""

from __future__ import annotations

import jax


def is_hopper(device=None) -> bool:
    """Whether `device` (default: the first JAX device) is a Hopper GPU (compute capability 9.x: wgmma, TMA)."""
    device = device if device is not None else jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).split(".")[0] == "9"


def kernel_args(kernels: str) -> dict:
    """A model's kernel choice ("auto", "kernel", "reference", "interpret") as a kernel wrapper's arguments:
    "interpret" is the kernel under the Mosaic GPU interpreter (CPU tests of the wiring)."""
    if kernels == "interpret":
        return {"impl": "kernel", "interpret": True}
    return {"impl": kernels, "interpret": False}
