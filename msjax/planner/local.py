"""The plan `msjax serve` picks for the machine it runs on (`plan = "auto"`, the default).

GPUs of a catalog type: the planner's search (disaggregated, Algorithm 1) and its colocated baseline on that
many GPUs of that type, the plan with the most decode tokens/s under the TPOT SLO that fits the GPUs at hand.
CPU only: colocated, one program. The catalog has no CPU entry to plan for, and on a CPU host a disaggregated
plan does not buy what it buys on GPUs: its nodes are XLA host devices that share the same cores (so attention
and experts do not run on separate hardware, the point of the paper's §3) and every layer adds two M2N hops.
The disaggregated demo over 8 host devices stays one flag away (`--plan disaggregated`).
"""

from __future__ import annotations

import dataclasses
import os

from msjax.config import DeploymentPlan, ModelConfig
from msjax.errors import ConfigError

DEFAULT_SLO_MS = 150.0  # the planner CLI's default TPOT SLO


@dataclasses.dataclass(frozen=True)
class PlanChoice:
    """The plan (None: one device, one program) and a sentence that says why it was chosen."""

    plan: DeploymentPlan | None
    reason: str

    def describe(self) -> str:
        p = self.plan
        if p is None:
            return "colocated (one device, one program)"
        on = lambda gpu: f" x {gpu}" if gpu else ""  # noqa: E731 - a plan file may name no GPU type
        if p.is_colocated:
            return f"colocated on {p.colocated_devices} devices{on(p.attention_gpu)}, m={p.micro_batches}"
        return (f"attention {p.attention_nodes} nodes x {p.attention_tp} devices{on(p.attention_gpu)}, experts "
                f"{p.expert_nodes} nodes x {p.expert_tp} devices{on(p.expert_gpu)}, m={p.micro_batches}")


def catalog_gpu_name(device_kind: str, names) -> str | None:
    """The catalog entry a JAX `device_kind` ("NVIDIA H100 80GB HBM3") names: the longest catalog name that
    appears in it as a word, so "H20" is not read out of "H200"."""
    words = device_kind.upper().replace("-", " ").split()
    found = [n for n in names if n.upper() in words]
    return max(found, key=len) if found else None


def choose_plan(model: ModelConfig, devices=None, *, slo_ms: float = DEFAULT_SLO_MS, catalog=None) -> PlanChoice:
    """The plan for `model` on `devices` (default: jax.devices()); see the module docstring."""
    if devices is None:
        import jax
        devices = jax.devices()
    if not devices:
        raise ConfigError("plan", "no devices to plan for")
    platform = devices[0].platform
    if platform == "cpu":
        return PlanChoice(None, f"CPU only ({os.cpu_count()} cores): one program on every core; a disaggregated "
                          "plan's host devices would share the same cores and add two M2N hops per layer "
                          "(--plan disaggregated runs the 8-host-device demo)")
    from msjax.planner.catalog import load_catalog
    from msjax.planner.colocated import colocated_baseline
    from msjax.planner.search import by_cost_efficiency, search
    from msjax.planner.utilization import load_utilization
    cat = catalog if catalog is not None else load_catalog(None)
    kind, count = devices[0].device_kind, len(devices)
    name = catalog_gpu_name(kind, cat.names)
    if name is None:
        return PlanChoice(None, f"{count}x {kind} is not in the planner's catalog ({', '.join(cat.names)}): "
                          "colocated on one device; add it to a catalog file to plan for it")
    # the GPUs at hand are one node: tensor parallelism up to `count`, and no plan needing more GPUs
    gpu = dataclasses.replace(cat[name], gpus_per_node=min(cat[name].gpus_per_node, count))
    network = load_utilization(None)
    candidates = colocated_baseline(model, [gpu], slo_ms, network=network)
    try:
        candidates += search(model, [gpu], slo_ms, network=network)
    except ConfigError:  # no disaggregated plan at all; the colocated ones may still fit
        pass
    fitting = [c for c in candidates if c.plan.num_devices <= count]
    if not fitting:
        return PlanChoice(None, f"no planned deployment of {model.architecture} fits {count}x {name} under "
                          f"a {slo_ms:g} ms TPOT: colocated on one device")
    best = by_cost_efficiency(fitting)[0]  # one GPU type: per cost is per GPU
    p = best.prediction
    return PlanChoice(best.plan, f"{count}x {name}: the planner's best of {len(fitting)} plans that fit, "
                      f"{best.describe()}, predicts {p.tokens_per_s:,.0f} tok/s at batch {p.batch} "
                      f"(TPOT {p.tpot_ms:.0f} ms <= {slo_ms:g} ms SLO, {p.source})")
