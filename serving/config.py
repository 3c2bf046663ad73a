"""`ServeConfig`: what `msjax.serve` and `msjax serve` start, validated at construction (errors name the field).

A TOML file holds the same fields at the top level or under `[serve]`; engine options (`msjax.EngineConfig`
fields such as `max_num_seqs` or `num_pages`) go under `[engine]`:

    [serve]
    model = "tiny-moe"
    grpc_port = 50051
    http_port = 8000
    max_concurrent_requests = 32

    [engine]
    max_num_seqs = 16
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from msjax.config import DeploymentPlan, EngineConfig
from msjax.errors import ConfigError

# The disaggregated demo (`plan = "disaggregated"`): over the 8 host devices the server forces on a CPU machine
# (2 attention replicas of 2 devices each, 4 expert nodes of 1 device), the micro-batch ping-pong of the paper
# with m = 2. Not the default: "auto" (msjax.planner.local) picks the plan for the hardware at hand.
DISAGGREGATED_DEMO_PLAN = DeploymentPlan(attention_nodes=2, attention_tp=2, expert_nodes=4, expert_tp=1,
                                         micro_batches=2)
PLAN_NAMES = ("auto", "disaggregated", "colocated")


def _port(obj, name):
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(name, f"must be a port number in [0, 65535] (0: any free port), got {value!r}")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model: str = "tiny-moe"  # preset name or HF checkpoint directory
    # a DeploymentPlan, the path of its TOML file, "auto" (the planner's choice for the devices found; on a CPU
    # machine colocated), "disaggregated" (DISAGGREGATED_DEMO_PLAN, over 8 host devices) or "colocated" (one
    # device, one program)
    plan: DeploymentPlan | str | os.PathLike | None = "auto"
    host: str = "127.0.0.1"  # "0.0.0.0" to listen on all interfaces
    grpc_port: int = 50051  # 0: any free port (the handle's grpc_address tells which)
    http_port: int = 8000  # 0: any free port; -1 turns the HTTP API off
    max_concurrent_requests: int = 32  # requests in the engine at once
    max_queue: int = 128  # requests waiting for a slot beyond those; more are refused (429 / RESOURCE_EXHAUSTED)
    max_prompt_tokens: int | None = None  # None: the model's context minus one
    max_tokens_cap: int | None = None  # largest max_tokens a request may ask for; None: the model's context
    tls_cert: str | None = None  # PEM files: both set turns TLS on for gRPC and HTTP
    tls_key: str | None = None
    api_token: str | None = None  # set: clients must send "authorization: Bearer <token>"
    served_model_name: str | None = None  # the name clients use in "model"; None: `model`
    drain_timeout_s: float = 30.0  # on stop(): how long in-flight requests may finish before they are aborted
    # compile every step shape before reporting ready (EngineLoop.warmup): the first request is as fast as the
    # tenth; False starts serving at once and compiles each shape when a request first needs it
    warmup: bool = True
    # a directory for JAX's persistent compilation cache (msjax.runtime.compile_cache): a restart loads the
    # warm-up's programs instead of compiling them; None: no cache. `msjax serve` uses ~/.cache/msjax/xla
    compile_cache: str | None = None
    engine: dict = dataclasses.field(default_factory=dict)  # EngineConfig fields

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model", f"must be a preset name or a checkpoint directory, got {self.model!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("host", f"must be a host name or address, got {self.host!r}")
        _port(self, "grpc_port")
        if self.http_port != -1:
            _port(self, "http_port")
        for name in ("max_concurrent_requests", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name != "max_queue" else 0):
                raise ConfigError(name, f"must be an integer >= {1 if name != 'max_queue' else 0}, got {value!r}")
        for name in ("max_prompt_tokens", "max_tokens_cap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(name, f"must be a positive integer or unset, got {value!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert" if self.tls_cert is None else "tls_key",
                              "TLS needs both tls_cert and tls_key")
        for name in ("tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(name, f"{value} is not a file")
        if self.api_token is not None and (not isinstance(self.api_token, str) or not self.api_token):
            raise ConfigError("api_token", "must be a non-empty string or unset")
        if not isinstance(self.warmup, bool):
            raise ConfigError("warmup", f"must be true or false, got {self.warmup!r}")
        if self.compile_cache is not None and (not isinstance(self.compile_cache, str) or not self.compile_cache):
            raise ConfigError("compile_cache", f"must be a directory or unset, got {self.compile_cache!r}")
        if not isinstance(self.drain_timeout_s, (int, float)) or self.drain_timeout_s < 0:
            raise ConfigError("drain_timeout_s", f"must be >= 0, got {self.drain_timeout_s!r}")
        if self.plan == "default":  # the name of the demo plan until it stopped being the default
            raise ConfigError("plan", "'default' is no longer a plan name: 'auto' (the planner's choice for this "
                              "machine, the default) or 'disaggregated' (the 8-device demo)")
        if not isinstance(self.engine, dict):
            raise ConfigError("engine", f"must be a table of EngineConfig fields, got {self.engine!r}")
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(self.engine) - known)
        if unknown:
            raise ConfigError(f"engine.{unknown[0]}", f"unknown engine option; known: {', '.join(sorted(known))}")
        EngineConfig(**self.engine)  # validates the values

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    @property
    def needs_host_devices(self) -> bool:
        """Whether the plan may need more than one XLA host device on a CPU machine (the server then forces
        eight before JAX starts); "auto" plans for what it finds, so it never does."""
        return self.plan not in (None, "auto", "colocated")

    def plan_choice(self, devices=None):
        """The plan and why (msjax.planner.local.PlanChoice); "auto" asks the planner about `devices` (default:
        jax.devices(), which starts JAX's backend)."""
        from msjax.planner.local import PlanChoice, choose_plan
        plan = self.plan
        if plan == "auto":
            from msjax.planner.search import resolve_model
            return choose_plan(resolve_model(self.model), devices)
        if plan is None or plan == "colocated":
            return PlanChoice(None, "asked for: plan = colocated")
        if plan == "disaggregated":
            return PlanChoice(DISAGGREGATED_DEMO_PLAN, "asked for: plan = disaggregated (the 8-device demo)")
        if isinstance(plan, DeploymentPlan):
            return PlanChoice(plan, "asked for: the given DeploymentPlan")
        if not Path(plan).is_file():
            raise ConfigError("plan", f"{plan} is neither {', '.join(map(repr, PLAN_NAMES))} nor a plan file")
        return PlanChoice(DeploymentPlan.load(plan), f"asked for: plan file {plan}")

    def resolved_plan(self, devices=None) -> DeploymentPlan | None:
        return self.plan_choice(devices).plan

    @classmethod
    def from_toml(cls, text: str, **overrides) -> "ServeConfig":
        """Fields from TOML text (top level or `[serve]`, engine options under `[engine]`), then `overrides`
        (those that are not None)."""
        import tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError("config", f"not valid TOML ({err})") from None
        table = dict(data.get("serve", {k: v for k, v in data.items()
                                        if k != "engine" and not (k == "plan" and isinstance(v, dict))}))
        if "engine" in data:
            table["engine"] = dict(data["engine"])
        if isinstance(data.get("plan"), dict):  # an inline [plan] table
            table["plan"] = DeploymentPlan(**data["plan"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown serve option; known: {', '.join(sorted(known))}")
        table.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**table)

    @classmethod
    def load(cls, path, **overrides) -> "ServeConfig":
        return cls.from_toml(Path(path).read_text(), **overrides)
