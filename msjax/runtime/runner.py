"""The one interface between the engine and the devices: `Runner`, and `make_runner`, which resolves a plan once
and builds the runner for it.

    runner = make_runner(model, engine_config, plan)      # plan resolved and validated here, once
    sampled = runner.step(batches)                        # batches[a][i]: micro-batch i of attention node a
    runner.expert_load(); runner.set_placement(placement, shares); runner.health(); runner.close()

Two runners implement it: `ColocatedRunner` (every module in one program: one device, or the colocated baseline
over several) and `NodeRunner` (attention and expert nodes as services, in this process or in processes of
their own, over the plan's transport). The engine, `msjax launch`, the profiler and serving use only this.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol, runtime_checkable

import numpy as np

from msjax.config import DeploymentPlan, EngineConfig
from msjax.runtime.deployment import Deployment, resolve


@dataclasses.dataclass(frozen=True)
class NodeHealth:
    role: str  # "attention" | "expert" | "colocated"
    index: int
    where: str  # "local" (the runner's process) or "process"
    pid: int
    alive: bool


@dataclasses.dataclass(frozen=True)
class RunnerHealth:
    """Whether the runner can step: open, and every node alive (a cheap check, safe from any thread)."""

    healthy: bool
    detail: str  # why not, when not
    nodes: tuple[NodeHealth, ...]
    degraded: str = ""  # healthy, on fewer expert nodes than the plan has: which are lost
    lost: tuple[int, ...] = ()  # the expert nodes lost (a re-placement must leave them empty)


@runtime_checkable
class Runner(Protocol):
    deployment: Deployment

    def step(self, batches: list[list]) -> list[list]:
        """Run one step: `batches[a][i]` (a `StepBatch`) is micro-batch i of attention node a. Returns the
        sampled tokens in the same layout (objects with `tokens`, `logprobs`, `top_ids`, `top_logprobs` as
        numpy arrays)."""

    def expert_load(self) -> np.ndarray | None:
        """[num_experts] tokens routed to each expert (summed over layers) since the last read, or None when
        this runner has no expert nodes to balance."""

    def set_placement(self, placement: tuple[tuple[int, ...], ...],
                      shares: tuple[tuple[float, ...], ...] | None = None) -> None:
        """Re-place the experts between steps (replicas allowed, `shares` splitting their tokens); requests in
        flight keep their KV caches. A ConfigError when the runner has no expert nodes or the placement is bad."""

    def health(self) -> RunnerHealth: ...

    def attach_timeline(self, timeline) -> None:
        """Log each program launch to `timeline` (a `msjax.runtime.timeline.Timeline`; None stops)."""

    def close(self) -> None:
        """Release devices and node processes. Idempotent."""


def make_runner(model, engine_config: EngineConfig, plan: DeploymentPlan | None = None, devices=None, *,
                checkpoint: str | os.PathLike | None = None, timeout_s: float = 60.0,
                startup_timeout_s: float = 120.0) -> Runner:
    """The runner for `plan` (None: one device, one program) over `model` (an `MoEModel`). `checkpoint`: the HF
    directory the model came from, which node processes read their own weights from (without one the runner
    hands them theirs). Timeouts: how long a node's packet or reply may take, and its start-up."""
    deployment = resolve(model.cfg, engine_config, plan, devices)
    model = model.with_kernels(deployment.engine.kernels)
    if deployment.is_colocated:
        from msjax.runtime.colocated import ColocatedRunner
        return ColocatedRunner(model, deployment)
    from msjax.runtime.node_runner import NodeRunner
    return NodeRunner(model, deployment, checkpoint=checkpoint, timeout_s=timeout_s,
                      startup_timeout_s=startup_timeout_s)


class NoDeviceRunner:
    """A `Runner` without a device: `step` returns sampled tokens of the right shapes at once (token 1), so
    timing `Engine.step` with it measures only the engine's host work, and engine tests compile nothing.
    Subclass `sample` for other tokens."""

    deployment = None

    def step(self, batches):
        return [[self.sample(b) for b in node] for node in batches]

    def sample(self, batch):
        from msjax.runtime.sampler import Sampled
        n, k = len(batch.logit_rows), batch.num_logprobs
        return Sampled(np.ones(n, np.int32), np.zeros(n, np.float32), np.zeros((n, k), np.int32),
                       np.zeros((n, k), np.float32))

    def expert_load(self):
        return None

    def set_placement(self, placement, shares=None) -> None:
        from msjax.errors import ConfigError
        raise ConfigError("plan", "this runner has no expert nodes")

    def health(self) -> RunnerHealth:
        return RunnerHealth(True, "", ())

    def attach_timeline(self, timeline) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = ["NoDeviceRunner", "NodeHealth", "Runner", "RunnerHealth", "make_runner"]
