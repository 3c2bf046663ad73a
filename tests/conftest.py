"""Test set-up: eight forced host devices (set before JAX starts) so multi-device plans run on a CPU."""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


import gc

import pytest
from hypothesis import settings

# Hypothesis draws the same examples everywhere: under CI=true it would switch to derandomized examples by itself,
# so a case that only CI draws could fail (or hang) there and never here.
settings.register_profile("msjax", derandomize=True, database=None)
settings.load_profile("msjax")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop compiled programs and dead arrays after each test file: the suite compiles hundreds of programs
    (eight host devices, interpreted Pallas kernels) and one process would otherwise keep them all."""
    yield
    import jax
    jax.clear_caches()
    gc.collect()
