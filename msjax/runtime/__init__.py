"""The device side: `make_runner(model, engine_config, plan)` resolves a plan once and builds the `Runner` that
runs the engine's steps, every module in one program (`colocated`) or attention and expert nodes as services
(`node_runner`, `nodes`, `layer_programs`) hosted in the engine's process or in node processes (`hosts`,
`node_process`, `processes`), driven by typed requests (`protocol`). Map: docs/runtime.md.

Names are loaded on first use (`from msjax.runtime import make_runner`): the engine imports this package's
small modules without loading JAX's programs.
"""

_EXPORTS = {"Runner": "runner", "RunnerHealth": "runner", "make_runner": "runner", "Deployment": "deployment",
            "resolve": "deployment", "WorkerError": "hosts"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"msjax.runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'msjax.runtime' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
