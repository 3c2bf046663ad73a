"""msjax: MegaScale-Infer-style disaggregated MoE serving on JAX.

Public API (serving arrives with its issue): `LLM`, `SamplingParams`, `Engine`, `EngineConfig`,
`DeploymentPlan`, `plan` (the deployment-plan search), `ModelConfig`, `load_model`.
"""

from msjax.config import DeploymentPlan, EngineConfig, ModelConfig, RopeConfig
from msjax.engine.engine import Engine, RequestDelta
from msjax.engine.sampling_params import InvalidRequestError, SamplingParams
from msjax.errors import CheckpointError, ConfigError, ModelTooLargeError, UnknownArchitectureError
from msjax.llm import LLM, RequestOutput
from msjax.models import load as load_model
from msjax.planner import plan

__all__ = ["LLM", "CheckpointError", "ConfigError", "DeploymentPlan", "Engine", "EngineConfig", "InvalidRequestError", "ModelConfig",
           "ModelTooLargeError", "RequestDelta", "RequestOutput", "RopeConfig", "SamplingParams",
           "UnknownArchitectureError", "load_model", "plan"]
