"""The baseline the paper compares against: every module on the same GPUs (vLLM / TensorRT-LLM style).

A group of up to one server's GPUs runs attention tensor-parallel and the experts expert-parallel (E / g experts
per GPU, an all-to-all over NVLink/PCIe to dispatch and combine); a model too large for one server is split
into pipeline stages of whole servers, each holding L / stages layers, with one micro-batch per stage in
flight. Nothing overlaps inside a layer: T_layer = T_a + T_e + 2 T_c. Same roofline and memory assumptions as the
disaggregated model, so the comparison isolates the deployment, not the kernels.
"""

from __future__ import annotations

import dataclasses
import math

from msjax.config import DeploymentPlan, ModelConfig
from msjax.planner.catalog import GpuSpec
from msjax.planner.model import (BF16_BYTES, Assumptions, LinearCost, Prediction, Workload, attention_roofline,
                                 expert_roofline, kv_bytes_per_token, weight_bytes)
from msjax.planner.search import Candidate, check_request, largest_satisfying, tensor_parallel_sizes
from msjax.planner.utilization import NetworkUtilization

PIPELINE_STAGES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class ColocatedModel:
    """`stages` pipeline stages of `group` GPUs of one type, each holding every module of its layers."""

    model: ModelConfig
    gpu: GpuSpec
    group: int  # GPUs per stage: attention TP size and expert-parallel size
    stages: int
    attention: LinearCost  # T_a(b) at tp = group
    expert: LinearCost  # one expert's T(b) at tp = max(1, group / E)
    network: NetworkUtilization
    workload: Workload = Workload()
    assumptions: Assumptions = Assumptions()

    @property
    def experts_per_gpu(self) -> int:
        return math.ceil(self.model.num_experts / self.group)

    @property
    def num_gpus(self) -> int:
        return self.group * self.stages

    def max_micro_batch(self) -> int:
        """Per stage: its share of the weights plus the KV cache of all B = stages·b sequences for its layers."""
        capacity = self.group * self.gpu.memory_bytes * self.assumptions.memory_fraction
        free = capacity - weight_bytes(self.model.param_count()) / self.stages
        per_sequence = kv_bytes_per_token(self.model, self.group) * self.workload.seq_len / self.stages
        return max(0, math.floor(free / (self.stages * per_sequence)))

    def predict(self, micro_batch: int) -> Prediction:
        model, g, b = self.model, self.group, micro_batch
        per_expert = b * model.top_k / model.num_experts
        t_a = self.attention(b)
        t_e = self.experts_per_gpu * self.expert(per_expert)
        # all-to-all, one direction: each GPU holds b / g tokens, K copies each, (g - 1) / g of them leave it
        t_c = b / g * model.top_k * model.hidden_size * BF16_BYTES * (g - 1) / g / self.gpu.intra_node_bytes_per_s
        hop = 0.0
        if self.stages > 1:  # activations to the next server, spread over its NICs
            hop = self.network.transfer_time(b * model.hidden_size * BF16_BYTES / g, self.gpu.network_bytes_per_s)
        tpot = model.num_layers * (t_a + t_e + 2 * t_c) + self.stages * hop
        return Prediction(batch=b * self.stages, micro_batch=b, expert_micro_batch=per_expert, t_a_ms=t_a * 1e3,
                          t_e_ms=t_e * 1e3, t_c_ms=t_c * 1e3, tpot_ms=tpot * 1e3, num_gpus=self.num_gpus,
                          cost=self.num_gpus * self.gpu.price, source=self.attention.source,
                          hides_communication=False)


def colocated_models(model: ModelConfig, gpu: GpuSpec, network: NetworkUtilization, workload: Workload,
                     assumptions: Assumptions) -> list[ColocatedModel]:
    """Every group size the heads and experts divide, and pipeline depths of whole servers."""
    setups = []
    for group in tensor_parallel_sizes(gpu):
        kv = model.num_kv_heads
        if model.num_heads % group or (kv % group and group % kv):
            continue
        if group > model.num_experts and group % model.num_experts:
            continue
        expert_tp = max(1, group // model.num_experts)
        if model.expert_ffn_size % expert_tp:
            continue
        for stages in PIPELINE_STAGES:
            if (stages > 1 and group != gpu.gpus_per_node) or stages > model.num_layers:
                continue
            setups.append(ColocatedModel(model, gpu, group, stages,
                                         attention_roofline(model, gpu, group, workload, assumptions),
                                         expert_roofline(model, gpu, expert_tp, assumptions), network, workload,
                                         assumptions))
    return setups


def colocated_baseline(model: ModelConfig, gpus: list[GpuSpec], slo_ms: float, *, network: NetworkUtilization,
                       workload: Workload = Workload(), assumptions: Assumptions = Assumptions()) -> list[Candidate]:
    """The best batch under the SLO for every colocated set-up on each GPU type (homogeneous by nature),
    unsorted; empty when none fits or meets the SLO (the baseline is a comparison, not a plan to deploy)."""
    check_request(gpus, slo_ms)
    found = []
    for gpu in gpus:
        for setup in colocated_models(model, gpu, network, workload, assumptions):
            b = largest_satisfying(lambda n: setup.predict(n).tpot_ms <= slo_ms, setup.max_micro_batch())
            if not b:
                continue
            prediction = setup.predict(b)
            plan = dataclasses.replace(DeploymentPlan.colocated(setup.num_gpus, micro_batches=setup.stages),
                                       max_batch=prediction.batch, attention_gpu=gpu.name, expert_gpu=gpu.name)
            found.append(Candidate(plan, prediction))
    return found
