"""Performance model of disaggregated expert parallelism (paper §4.1 and §4.2).

Per MoE layer and micro-batch, an attention node takes T_a = k1·b_a + k2 and an expert node T_e = k3·b_e + k4
(linear in the tokens it holds); the coefficients come from a roofline of the GPU and the model's shapes
("roofline") or from a least-squares fit of profiled times ("measured", see `profile.py`). Communication T_c
follows Eq. 6 with a bandwidth-utilisation curve. Eq. 1-5, 7 and 8 then give the pipeline's latency,
throughput and memory limits.

The roofline is additive: a step's time is its memory traffic at the achievable bandwidth plus its FLOPs at
the achievable compute rate. That keeps T linear in the batch, as the paper models it, and is pessimistic by at
most 2x right at the roofline knee (where the two are equal and a real kernel overlaps them). Units inside are
SI (bytes, seconds); predictions report milliseconds.
"""

from __future__ import annotations

import dataclasses
import math

from msjax.config import ModelConfig
from msjax.errors import ConfigError
from msjax.planner.catalog import GpuSpec
from msjax.planner.utilization import NetworkUtilization

BF16_BYTES = 2  # weights, activations and KV cache are bfloat16 (paper §7.1)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the decode batch looks like. The paper's production trace has median input 571 and output 159
    tokens, so a sequence half-way through decoding holds about 571 + 159 / 2 = 650 tokens of KV cache."""

    seq_len: int = 650  # s: average context of a decoding sequence

    def __post_init__(self):
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ConfigError("seq_len", f"must be a positive integer, got {self.seq_len!r}")


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What fraction of the spec sheet real kernels reach. Assumptions, not measurements: a measured profile
    replaces the first three for the roles it covers."""

    memory_efficiency: float = 0.8  # of spec memory bandwidth, reached by decode GEMMs and paged attention
    compute_efficiency: float = 0.7  # of dense bf16 peak, reached by large GEMMs
    overhead_us: float = 10.0  # per module and layer: kernel launches and synchronisation
    memory_fraction: float = 0.9  # of GPU memory for weights + KV (the rest: activations, workspace)

    def __post_init__(self):
        for name in ("memory_efficiency", "compute_efficiency", "memory_fraction"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(name, f"must lie in (0, 1], got {value!r}")
        if not self.overhead_us >= 0:
            raise ConfigError("overhead_us", f"must be >= 0, got {self.overhead_us!r}")


@dataclasses.dataclass(frozen=True)
class LinearCost:
    """Seconds one node spends on one MoE layer for a micro-batch of `tokens`: slope·tokens + intercept."""

    slope: float  # k1 or k3, seconds per token
    intercept: float  # k2 or k4, seconds
    source: str  # "roofline" or "measured"

    def __call__(self, tokens: float) -> float:
        return self.slope * tokens + self.intercept


# --- model shapes ---

def expert_layer_params(model: ModelConfig) -> int:
    """One routed expert in one layer: gate, up and down projections."""
    return 3 * model.hidden_size * model.expert_ffn_size


def expert_params(model: ModelConfig) -> int:
    """P_e: what one expert node holds (one expert, every layer)."""
    return model.num_layers * expert_layer_params(model)


def attention_params(model: ModelConfig) -> int:
    """P_a: what one attention node holds: everything but the routed experts (attention, router, norms,
    embeddings, LM head, and a shared expert where the model has one: the planner runs it beside attention)."""
    return model.param_count() - model.num_experts * expert_params(model)


def lm_head_params(model: ModelConfig) -> int:
    return model.vocab_size * model.hidden_size


def attention_layer_params(model: ModelConfig) -> float:
    """Weights an attention node reads per layer (the embeddings and LM head excluded)."""
    embeddings = model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2) + model.hidden_size
    return (attention_params(model) - embeddings) / model.num_layers


def kv_bytes_per_token(model: ModelConfig, tp: int = 1) -> int:
    """KV cache of one token over all layers on one attention node. KV heads are split over the node's GPUs;
    beyond tp = num_kv_heads each GPU keeps a copy of its head, so the node stores tp / num_kv_heads copies."""
    copies = max(1, tp // model.num_kv_heads)
    return 2 * model.num_kv_heads * model.head_dim * model.num_layers * BF16_BYTES * copies


def weight_bytes(params: float) -> float:
    return params * BF16_BYTES


# --- roofline coefficients ---

def _all_reduce_seconds_per_token(model: ModelConfig, gpu: GpuSpec, tp: int) -> float:
    """Ring all-reduce of one token's hidden state inside a node: 2 (tp - 1) / tp of it crosses each link."""
    if tp == 1:
        return 0.0
    return 2 * (tp - 1) / tp * model.hidden_size * BF16_BYTES / gpu.intra_node_bytes_per_s


def attention_roofline(model: ModelConfig, gpu: GpuSpec, tp: int, workload: Workload = Workload(),
                       assumptions: Assumptions = Assumptions()) -> LinearCost:
    """k1, k2 of an attention node of `tp` GPUs. Per token: read its KV cache (s tokens), the QKV/output/router
    GEMMs and the attention FLOPs, the tensor-parallel all-reduce. Fixed: read the layer's weights. The LM head
    runs once per step and is spread over the layers (it is part of the attention node's work)."""
    bandwidth = gpu.memory_bytes_per_s * assumptions.memory_efficiency
    flops = gpu.flops_per_s * assumptions.compute_efficiency
    s, layers = workload.seq_len, model.num_layers
    kv_read = kv_bytes_per_token(model, tp) / tp / layers * s  # bytes per GPU per token per layer
    gemm_flops = 2 * (attention_layer_params(model) + lm_head_params(model) / layers) / tp
    attention_flops = 4 * s * model.num_heads * model.head_dim / tp  # QK^T and PV
    slope = kv_read / bandwidth + (gemm_flops + attention_flops) / flops + \
        _all_reduce_seconds_per_token(model, gpu, tp)
    weights = weight_bytes(attention_layer_params(model) + lm_head_params(model) / layers) / tp
    return LinearCost(slope, weights / bandwidth + assumptions.overhead_us * 1e-6, "roofline")


def expert_roofline(model: ModelConfig, gpu: GpuSpec, tp: int,
                    assumptions: Assumptions = Assumptions()) -> LinearCost:
    """k3, k4 of an expert node of `tp` GPUs holding one expert: FFN FLOPs and the all-gather/reduce-scatter
    of tokens inside the node per token; the expert's weights once per micro-batch."""
    bandwidth = gpu.memory_bytes_per_s * assumptions.memory_efficiency
    flops = gpu.flops_per_s * assumptions.compute_efficiency
    slope = 2 * expert_layer_params(model) / tp / flops + _all_reduce_seconds_per_token(model, gpu, tp)
    intercept = weight_bytes(expert_layer_params(model)) / tp / bandwidth + assumptions.overhead_us * 1e-6
    return LinearCost(slope, intercept, "roofline")


# --- the paper's analytic relations ---

def compute_bound_batch(gpu: GpuSpec) -> float:
    """§2.3: a bf16 GEMM is compute-bound once the batch reaches F / B (FLOP/s over bytes/s)."""
    return gpu.flops_per_s / gpu.memory_bytes_per_s


def ffn_utilization(batch: float, model: ModelConfig, gpu: GpuSpec) -> float:
    """§2.3: theoretical MFU of the FFN of an MoE model at a decode batch: min(topk / #expert · B / F · b, 1)."""
    return min(model.top_k / model.num_experts * batch / compute_bound_batch(gpu), 1.0)


def balanced_attention_nodes(attention: LinearCost, expert: LinearCost, model: ModelConfig) -> float:
    """§4.2: n_a = k1·E / (k3·K) makes T_a = T_e when b_a·n_a = b_e·E / K (intercepts aside)."""
    return attention.slope * model.num_experts / (expert.slope * model.top_k)


def min_micro_batches(t_c: float, t_f: float) -> int:
    """Eq. 3: m >= 2 (1 + T_c / T_f) hides communication: 3 when T_c < T_f / 2, 4 when T_c < T_f."""
    return math.ceil(2 * (1 + t_c / t_f) - 1e-9)


def hides_communication(t_a: float, t_e: float, t_c: float, m: int) -> bool:
    """Constraints 2 and 3."""
    t_f = max(t_a, t_e)
    return t_c < t_f and m * t_f >= 2 * (t_f + t_c)


def iteration_latency_bounds(t_a: float, t_e: float, t_c: float, m: int, layers: int) -> tuple[float, float]:
    """Eq. 4: bounds of one micro-batch's decode iteration."""
    t_f = max(t_a, t_e)
    return (t_a + t_e + 2 * t_c) + m * t_f * (layers - 1), m * t_f * layers


def total_latency(t_a: float, t_e: float, t_c: float, m: int, layers: int) -> float:
    """Eq. 5: one decode iteration of the global batch, T_total = (T_a + T_e + 2 T_c) + T_f (m L - 1).

    When constraint 3 fails, a micro-batch's round trip T_a + T_e + 2 T_c outlasts m·T_f and the pipeline
    stalls: each layer then takes the round trip instead of m·T_f. With constraint 3 this is exactly Eq. 5."""
    t_f = max(t_a, t_e)
    round_trip = t_a + t_e + 2 * t_c
    period = max(m * t_f, round_trip)
    return round_trip - t_f + period * layers


# --- one disaggregated deployment ---

@dataclasses.dataclass(frozen=True)
class Prediction:
    """What the model predicts for one deployment at one batch size. Times per MoE layer and micro-batch."""

    batch: int  # B: sequences decoding together
    micro_batch: float  # b_a: tokens per micro-batch on one attention node (colocated: per pipeline stage)
    expert_micro_batch: float  # b_e: tokens per micro-batch on one expert (average over experts)
    t_a_ms: float
    t_e_ms: float
    t_c_ms: float
    tpot_ms: float  # time per output token: one decode iteration of the global batch
    num_gpus: int
    cost: float  # sum of GPU prices
    source: str  # where T_a and T_e came from: "roofline", "measured", or "attention: ..., expert: ..."
    hides_communication: bool  # constraints 2 and 3 hold

    @property
    def tokens_per_s(self) -> float:
        return self.batch / (self.tpot_ms / 1e3)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.num_gpus

    @property
    def tokens_per_s_per_cost(self) -> float:
        return self.tokens_per_s / self.cost

    @property
    def bottleneck(self) -> str:
        return "attention" if self.t_a_ms >= self.t_e_ms else "experts"


def describe_sources(attention: str, expert: str) -> str:
    return attention if attention == expert else f"attention: {attention}, expert: {expert}"


@dataclasses.dataclass(frozen=True)
class DisaggregatedModel:
    """Attention nodes of `attention_tp` GPUs of one type, one expert per node of `expert_tp` GPUs of another:
    predicts latency and throughput for any n_a, m and b_a."""

    model: ModelConfig
    attention_gpu: GpuSpec
    expert_gpu: GpuSpec
    attention_tp: int
    expert_tp: int
    attention: LinearCost  # T_a(b_a)
    expert: LinearCost  # T_e(b_e)
    network: NetworkUtilization
    workload: Workload = Workload()
    assumptions: Assumptions = Assumptions()

    @property
    def attention_weights_fit(self) -> bool:
        return weight_bytes(attention_params(self.model)) < self._capacity(self.attention_gpu, self.attention_tp)

    @property
    def expert_weights_fit(self) -> bool:
        """Algorithm 1 line 4 for experts: tp_e·C_e > P_e."""
        return weight_bytes(expert_params(self.model)) < self._capacity(self.expert_gpu, self.expert_tp)

    def _capacity(self, gpu: GpuSpec, tp: int) -> float:
        return tp * gpu.memory_bytes * self.assumptions.memory_fraction

    def max_micro_batch(self, m: int) -> int:
        """Eq. 8: the largest b_a whose KV cache, for m micro-batches, fits beside the attention weights."""
        free = self._capacity(self.attention_gpu, self.attention_tp) - weight_bytes(attention_params(self.model))
        per_token = kv_bytes_per_token(self.model, self.attention_tp) * self.workload.seq_len
        return max(0, math.floor(free / (m * per_token)))

    def communication_time(self, b_a: float, b_e: float) -> float:
        """Eq. 6: the slower of an attention GPU sending its share of b_a·K token copies and an expert GPU
        receiving its share of b_e tokens."""
        h, k = self.model.hidden_size, self.model.top_k
        send = b_a * h * k * BF16_BYTES / self.attention_tp
        receive = b_e * h * BF16_BYTES / self.expert_tp
        return max(self.network.transfer_time(send, self.attention_gpu.network_bytes_per_s),
                   self.network.transfer_time(receive, self.expert_gpu.network_bytes_per_s))

    def num_gpus(self, attention_nodes: int) -> int:
        return attention_nodes * self.attention_tp + self.model.num_experts * self.expert_tp

    def cost(self, attention_nodes: int) -> float:
        return (attention_nodes * self.attention_tp * self.attention_gpu.price
                + self.model.num_experts * self.expert_tp * self.expert_gpu.price)

    def predict(self, attention_nodes: int, micro_batches: int, micro_batch: float) -> Prediction:
        """Everything at b_a = `micro_batch`: B = b_a·m·n_a and b_e = b_a·n_a·K / E."""
        model, m = self.model, micro_batches
        b_e = micro_batch * attention_nodes * model.top_k / model.num_experts
        t_a, t_e = self.attention(micro_batch), self.expert(b_e)
        t_c = self.communication_time(micro_batch, b_e)
        return Prediction(
            batch=round(micro_batch * m * attention_nodes), micro_batch=micro_batch, expert_micro_batch=b_e,
            t_a_ms=t_a * 1e3, t_e_ms=t_e * 1e3, t_c_ms=t_c * 1e3,
            tpot_ms=total_latency(t_a, t_e, t_c, m, model.num_layers) * 1e3,
            num_gpus=self.num_gpus(attention_nodes), cost=self.cost(attention_nodes),
            source=describe_sources(self.attention.source, self.expert.source),
            hides_communication=hides_communication(t_a, t_e, t_c, m))
