"""msjax: MegaScale-Infer-style disaggregated MoE serving on JAX.

Public API: `LLM`, `SamplingParams`, `Engine`, `EngineConfig`, `DeploymentPlan`, `plan` (the deployment-plan
search), `ModelConfig`, `load_model`, and the server: `serve(ServeConfig(...))` (gRPC + OpenAI-compatible HTTP;
imported on first use so that `import msjax` does not load gRPC).
"""

from msjax.config import DeploymentPlan, EngineConfig, ModelConfig, RopeConfig
from msjax.engine.engine import Engine, RequestDelta
from msjax.engine.sampling_params import InvalidRequestError, SamplingParams
from msjax.errors import CheckpointError, ConfigError, ModelTooLargeError, UnknownArchitectureError
from msjax.llm import LLM, RequestOutput
from msjax.loading import load as load_model
from msjax.planner import plan

__all__ = ["LLM", "CheckpointError", "ConfigError", "DeploymentPlan", "Engine", "EngineConfig", "InvalidRequestError", "ModelConfig",
           "ModelTooLargeError", "RequestDelta", "RequestOutput", "RopeConfig", "SamplingParams",
           "ServeConfig", "UnknownArchitectureError", "load_model", "plan", "serve"]


def __getattr__(name):
    if name == "serve":
        from serving.server import serve
        return serve
    if name == "ServeConfig":
        from serving.config import ServeConfig
        return ServeConfig
    raise AttributeError(f"module 'msjax' has no attribute {name!r}")
