"""Eight host devices for CPU-only machines, so any plan of up to eight devices runs there: XLA reads the flag
when JAX starts its backend (not at import), and it is harmless where accelerators exist. The CLI and the server
set it before loading a model; node processes set their own count (`msjax.runtime.processes`)."""

from __future__ import annotations

import os

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"


def ensure_host_devices() -> None:
    """Add HOST_DEVICES_FLAG to XLA_FLAGS unless a device count is set already; only effective before JAX
    starts its backend."""
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {HOST_DEVICES_FLAG}".strip()
