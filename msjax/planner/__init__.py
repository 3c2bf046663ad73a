"""Deployment planning for disaggregated MoE serving (paper §4.2, §4.3): a performance model, a hardware
catalog and the plan search of Algorithm 1.

    from msjax.planner import plan
    best = plan("mixtral-8x22b", ["H20", "L40S"], slo_ms=150)[0]
    best.plan.save("plan.toml"); print(best.prediction.tokens_per_s_per_cost)

Every number is a model prediction (roofline coefficients unless a measured profile is given), not a
measurement; `Prediction.source` says which.
"""

from msjax.planner.catalog import Catalog, GpuSpec, default_catalog, load_catalog
from msjax.planner.colocated import ColocatedModel, colocated_baseline
from msjax.planner.model import (Assumptions, DisaggregatedModel, LinearCost, Prediction, Workload,
                                 attention_roofline, balanced_attention_nodes, compute_bound_batch, expert_roofline,
                                 ffn_utilization, iteration_latency_bounds, min_micro_batches, total_latency)
from msjax.planner.profile import MeasuredProfile, fit_linear, load_profile
from msjax.planner.search import Candidate, plan, resolve_model, search
from msjax.planner.utilization import NetworkUtilization, load_utilization

__all__ = ["Assumptions", "Candidate", "Catalog", "ColocatedModel", "DisaggregatedModel", "GpuSpec", "LinearCost",
           "MeasuredProfile", "NetworkUtilization", "Prediction", "Workload", "attention_roofline",
           "balanced_attention_nodes", "colocated_baseline", "compute_bound_batch", "default_catalog",
           "expert_roofline", "ffn_utilization", "fit_linear", "iteration_latency_bounds", "load_catalog",
           "load_profile", "load_utilization", "min_micro_batches", "plan", "resolve_model", "search",
           "total_latency"]
