"""Deployment-plan search (paper Algorithm 1 and §4.3): for every (attention GPU, expert GPU) pair, every
tp_a and tp_e whose weights fit, n_a balanced so T_a ≈ T_e, and every m up to N_m, binary-search the largest
global batch that meets the TPOT SLO, the KV-cache memory limit (Eq. 8) and hides communication (Eq. 2, 3);
rank the plans by decode throughput per unit cost.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable

from msjax.config import DeploymentPlan, ModelConfig
from msjax.errors import ConfigError
from msjax.planner.catalog import Catalog, GpuSpec, load_catalog
from msjax.planner.model import (Assumptions, DisaggregatedModel, LinearCost, Prediction, Workload,
                                 attention_params, attention_roofline, balanced_attention_nodes, expert_params,
                                 expert_roofline, weight_bytes)
from msjax.planner.profile import MeasuredProfile, load_profile
from msjax.planner.utilization import NetworkUtilization, load_utilization

MIN_MICRO_BATCHES = 3  # Eq. 3 with any communication at all (T_c > 0) needs m > 2
MAX_MICRO_BATCHES = 4  # N_m: the paper's choice; more micro-batches shrink the expert GEMMs


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A deployment plan and what the model predicts for it."""

    plan: DeploymentPlan
    prediction: Prediction

    def describe(self) -> str:
        p = self.plan
        if p.is_colocated:
            stages = f" x {p.micro_batches} pipeline stages" if p.micro_batches > 1 else ""
            return f"colocated {p.colocated_devices // p.micro_batches}x{p.attention_gpu}{stages}"
        return (f"attention {p.attention_nodes}x{p.attention_tp}x{p.attention_gpu}, "
                f"experts {p.expert_nodes}x{p.expert_tp}x{p.expert_gpu}, m={p.micro_batches}")


def by_cost_efficiency(candidates: list[Candidate]) -> list[Candidate]:
    """Best throughput per unit cost first; fewer GPUs break ties."""
    return sorted(candidates, key=lambda c: (-c.prediction.tokens_per_s_per_cost, c.prediction.num_gpus))


# --- inputs ---

def resolve_model(model: str | os.PathLike | ModelConfig) -> ModelConfig:
    """A ModelConfig, an HF checkpoint directory, or a preset name."""
    if isinstance(model, ModelConfig):
        return model
    if os.path.isdir(model):
        from msjax.checkpoint import read_config
        return read_config(model)
    from msjax.models.presets import preset_config
    return preset_config(str(model))


def resolve_catalog(catalog: Catalog | str | Path | None) -> Catalog:
    return catalog if isinstance(catalog, Catalog) else load_catalog(catalog)


def resolve_profile(profile: MeasuredProfile | str | Path | None) -> MeasuredProfile | None:
    return profile if profile is None or isinstance(profile, MeasuredProfile) else load_profile(profile)


def resolve_network(network: NetworkUtilization | str | Path | None) -> NetworkUtilization:
    return network if isinstance(network, NetworkUtilization) else load_utilization(network)


def check_request(gpus, slo_ms) -> None:
    if isinstance(gpus, str) or not gpus:
        raise ConfigError("gpus", f"must be a non-empty list of catalog names, got {gpus!r}")
    if isinstance(slo_ms, bool) or not isinstance(slo_ms, (int, float)) or not slo_ms > 0:
        raise ConfigError("slo_ms", f"must be a positive number of milliseconds, got {slo_ms!r}")


def tensor_parallel_sizes(gpu: GpuSpec) -> list[int]:
    """Powers of two up to a server's GPUs: TP stays on NVLink/PCIe inside one node (paper §2.2)."""
    return [1 << i for i in range(gpu.gpus_per_node.bit_length()) if 1 << i <= gpu.gpus_per_node]


def largest_satisfying(predicate: Callable[[int], bool], high: int) -> int:
    """The largest n in [1, high] with predicate(n), for a predicate that holds on a prefix; 0 if none."""
    low = 0
    while low < high:
        mid = (low + high + 1) // 2
        if predicate(mid):
            low = mid
        else:
            high = mid - 1
    return low


# --- the search ---

@dataclasses.dataclass
class _Diagnosis:
    """Why configurations failed, so that an empty search becomes a message that says what to change."""

    weights_fit: bool = False
    kv_fits: bool = False
    fastest: tuple[float, str] = (math.inf, "")
    network_bound: str = ""

    def saw_latency(self, tpot_ms: float, what: str) -> None:
        if tpot_ms < self.fastest[0]:
            self.fastest = (tpot_ms, what)


def _costs(role: str, model: ModelConfig, gpu: GpuSpec, profile: MeasuredProfile | None, workload: Workload,
           assumptions: Assumptions) -> dict[int, LinearCost]:
    """T(b) per tensor-parallel size: measured where the profile covers this role on this GPU, else roofline."""
    if profile is not None and profile.covers(role, gpu.name):
        return {tp: cost for tp in tensor_parallel_sizes(gpu)
                if (cost := profile.cost(role, gpu.name, tp)) is not None}
    if role == "attention":
        return {tp: attention_roofline(model, gpu, tp, workload, assumptions) for tp in tensor_parallel_sizes(gpu)}
    return {tp: expert_roofline(model, gpu, tp, assumptions) for tp in tensor_parallel_sizes(gpu)}


def _runtime_accepts(model: ModelConfig, tp_a: int, tp_e: int) -> bool:
    plan = DeploymentPlan(attention_tp=tp_a, expert_nodes=model.num_experts, expert_tp=tp_e)
    try:
        plan.validate(model, plan.num_devices)
    except ConfigError:
        return False
    return True


def _best_for(setup: DisaggregatedModel, attention_nodes: int, m: int, slo_ms: float,
              diagnosis: _Diagnosis) -> Candidate | None:
    """SIMULATE of Algorithm 1: the largest b_a (so B = b_a·m·n_a) meeting the SLO, Eq. 8 and Eq. 2-3."""
    limit = setup.max_micro_batch(m)
    if limit < 1:
        return None
    diagnosis.kv_fits = True
    what = (f"attention {attention_nodes}x{setup.attention_tp}x{setup.attention_gpu.name}, experts "
            f"{setup.model.num_experts}x{setup.expert_tp}x{setup.expert_gpu.name}, m={m}")
    diagnosis.saw_latency(setup.predict(attention_nodes, m, 1).tpot_ms, what)
    b_a = largest_satisfying(lambda b: setup.predict(attention_nodes, m, b).tpot_ms <= slo_ms, limit)
    # T_c / T_f grows with the batch (fixed weight reads dominate T_f at small b), so Eq. 2-3 hold on a prefix
    if b_a and not setup.predict(attention_nodes, m, b_a).hides_communication:
        b_a = largest_satisfying(lambda b: setup.predict(attention_nodes, m, b).hides_communication, b_a)
        if not b_a:
            diagnosis.network_bound = what
    if not b_a:
        return None
    prediction = setup.predict(attention_nodes, m, b_a)
    plan = DeploymentPlan(attention_nodes=attention_nodes, attention_tp=setup.attention_tp,
                          expert_nodes=setup.model.num_experts, expert_tp=setup.expert_tp, micro_batches=m,
                          max_batch=prediction.batch, attention_gpu=setup.attention_gpu.name,
                          expert_gpu=setup.expert_gpu.name)
    return Candidate(plan, prediction)


def search(model: ModelConfig, gpus: list[GpuSpec], slo_ms: float, *, profile: MeasuredProfile | None = None,
           network: NetworkUtilization, workload: Workload = Workload(), assumptions: Assumptions = Assumptions(),
           max_micro_batches: int = MAX_MICRO_BATCHES) -> list[Candidate]:
    """Every plan that meets the SLO (the best batch of each configuration), unsorted. Raises ConfigError
    saying why when there is none."""
    diagnosis = _Diagnosis()
    found = []
    for attention_gpu in gpus:
        attention_costs = _costs("attention", model, attention_gpu, profile, workload, assumptions)
        for expert_gpu in gpus:
            expert_costs = _costs("expert", model, expert_gpu, profile, workload, assumptions)
            for tp_e, expert_cost in expert_costs.items():
                for tp_a, attention_cost in attention_costs.items():
                    if not _runtime_accepts(model, tp_a, tp_e):
                        continue
                    setup = DisaggregatedModel(model, attention_gpu, expert_gpu, tp_a, tp_e, attention_cost,
                                               expert_cost, network, workload, assumptions)
                    if not (setup.attention_weights_fit and setup.expert_weights_fit):
                        continue
                    diagnosis.weights_fit = True
                    balance = balanced_attention_nodes(attention_cost, expert_cost, model)
                    for n_a in sorted({max(1, math.floor(balance)), max(1, math.ceil(balance))}):
                        for m in range(MIN_MICRO_BATCHES, max_micro_batches + 1):
                            candidate = _best_for(setup, n_a, m, slo_ms, diagnosis)
                            if candidate is not None:
                                found.append(candidate)
    if not found:
        raise _explain(model, gpus, slo_ms, diagnosis, assumptions)
    return found


def _explain(model: ModelConfig, gpus: list[GpuSpec], slo_ms: float, diagnosis: _Diagnosis,
             assumptions: Assumptions) -> ConfigError:
    names = ", ".join(g.name for g in gpus)
    biggest = max(gpus, key=lambda g: g.memory_gb * g.gpus_per_node)
    node_gb = biggest.memory_gb * biggest.gpus_per_node * assumptions.memory_fraction
    if not diagnosis.weights_fit:
        return ConfigError("gpus", (
            f"the model fits no GPU in [{names}]: an attention node needs "
            f"{weight_bytes(attention_params(model)) / 1e9:.1f} GB of weights plus KV cache and an expert node "
            f"{weight_bytes(expert_params(model)) / 1e9:.1f} GB, but the largest node "
            f"({biggest.gpus_per_node}x{biggest.name}) offers {node_gb:.0f} GB ({assumptions.memory_fraction:.0%} "
            "of its memory); add a GPU type with more memory"))
    if not diagnosis.kv_fits:
        return ConfigError("gpus", (
            f"the weights fit on [{names}] but leave no room for the KV cache of even one sequence per "
            f"micro-batch ({biggest.gpus_per_node}x{biggest.name} offers {node_gb:.0f} GB); add a GPU type with "
            "more memory or shorten the context"))
    if diagnosis.fastest[0] > slo_ms:
        return ConfigError("slo_ms", (
            f"no plan on [{names}] meets a TPOT of {slo_ms:g} ms: the fastest, {diagnosis.fastest[1]}, needs "
            f"{diagnosis.fastest[0]:.1f} ms even with one token per micro-batch; relax the SLO or add faster GPUs"))
    return ConfigError("network", (
        f"no plan on [{names}] hides communication under a TPOT of {slo_ms:g} ms (constraints 2-3, T_c < T_f "
        f"and m >= 2(1 + T_c/T_f)), e.g. {diagnosis.network_bound}; use faster NICs or allow more micro-batches"))


def plan(model: str | os.PathLike | ModelConfig, gpus: list[str], slo_ms: float, *,
         catalog: Catalog | str | Path | None = None, profile: MeasuredProfile | str | Path | None = None,
         top: int = 10, network: NetworkUtilization | str | Path | None = None, workload: Workload = Workload(),
         assumptions: Assumptions = Assumptions(), max_micro_batches: int = MAX_MICRO_BATCHES) -> list[Candidate]:
    """The `top` disaggregated plans for `model` on the GPU types `gpus` (catalog names) under a TPOT SLO,
    best decode throughput per unit cost first. Heterogeneous: every (attention GPU, expert GPU) pair is tried.

    `catalog`, `profile` and `network` take objects or file paths (see catalog.py, profile.py,
    utilization.py). Raises ConfigError when no plan exists, saying why (memory, SLO or network)."""
    check_request(gpus, slo_ms)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError("top", f"must be a positive integer, got {top!r}")
    if isinstance(max_micro_batches, bool) or not isinstance(max_micro_batches, int) or \
            max_micro_batches < MIN_MICRO_BATCHES:
        raise ConfigError("max_micro_batches", f"must be an integer >= {MIN_MICRO_BATCHES} (Eq. 3: m >= "
                          f"2(1 + T_c/T_f) > 2), got {max_micro_batches!r}")
    config, cat = resolve_model(model), resolve_catalog(catalog)
    found = search(config, [cat[name] for name in dict.fromkeys(gpus)], slo_ms, profile=resolve_profile(profile),
                   network=resolve_network(network), workload=workload, assumptions=assumptions,
                   max_micro_batches=max_micro_batches)
    return by_cost_efficiency(found)[:top]
