"""JAX's persistent compilation cache for a server: compiled programs are written to a directory and a restart
loads them instead of compiling again (the default plan's warm-up on 2 CPU cores: minutes cold, seconds cached).

Every program is cached, however quick to compile (JAX's default skips those under a second, which is most of a
small model's), and node processes started afterwards inherit the setting through the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DIR = "~/.cache/msjax/xla"


def enable(directory: str | os.PathLike) -> Path:
    """Cache compiled programs in `directory` (created if missing), for this process and the node processes it
    starts from now on. Returns the directory."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": str(path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.set_cache_dir(str(path))
    compilation_cache.reset_cache()  # a compile before this call found no cache; let the next one look again
    return path


__all__ = ["DEFAULT_DIR", "enable"]
