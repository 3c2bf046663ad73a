"""Frozen configuration dataclasses, validated at construction with errors that name the field.

`ModelConfig` is the architecture of one MoE model, family-neutral: each family module in
`msjax.models.families` maps an HF `config.json` onto it. Vary a config with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from msjax.comm.transports import PLAN_TRANSPORTS
from msjax.errors import ConfigError

MAX_LOGPROBS = 20  # top-n logprobs per token, at most (vLLM's default max_logprobs)

RopeKind = Literal["default", "linear", "llama3", "yarn"]
NormKind = Literal["rms", "layernorm"]
QKNorm = Literal["none", "head", "full"]


def _check_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(name, f"must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base `theta` and an optional frequency scaling (HF's `rope_scaling`)."""

    theta: float = 10000.0
    kind: RopeKind = "default"
    factor: float = 1.0
    # llama3 scaling
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # llama3 and yarn: the context length the model was pre-trained with
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.kind not in ("default", "linear", "llama3", "yarn"):
            raise ConfigError("rope_scaling.rope_type", f"unsupported RoPE scaling {self.kind!r}; "
                              "supported: default, linear, llama3, yarn")
        if not self.theta > 0:
            raise ConfigError("rope_theta", f"must be > 0, got {self.theta!r}")
        if self.kind != "default" and not self.factor > 0:
            raise ConfigError("rope_scaling.factor", f"must be > 0, got {self.factor!r}")
        if self.kind == "llama3" and self.original_max_position_embeddings is None:
            raise ConfigError("rope_scaling.original_max_position_embeddings", "required for llama3 scaling")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One MoE decoder-only transformer. Every layer is an attention block followed by an MoE block."""

    architecture: str  # the HF architecture name, e.g. "MixtralForCausalLM"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_ffn_size: int  # intermediate size of one routed expert
    rope: RopeConfig = RopeConfig()
    norm_kind: NormKind = "rms"
    norm_eps: float = 1e-6
    qk_norm: QKNorm = "none"  # "head": RMSNorm over head_dim (Qwen3); "full": over all heads (OLMoE)
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    clip_after_qk_norm: bool = False  # OLMoE clamps after q/k norm, DBRX clamps the fused QKV output
    # Router weighting: softmax over all experts, top-k, then divide by the p-norm of the k weights
    # (p=1 renormalises to a sum of one; None keeps the raw probabilities).
    topk_norm_p: float | None = 1.0
    shared_expert_ffn_size: int = 0  # 0: no shared expert
    shared_expert_gated: bool = False  # Qwen2-MoE: output scaled by sigmoid(x @ w_gate)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        _check_positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                        "num_experts", "top_k", "expert_ffn_size", "max_position_embeddings")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_key_value_heads",
                              f"{self.num_kv_heads} does not divide num_attention_heads={self.num_heads}")
        if self.top_k > self.num_experts:
            raise ConfigError("num_experts_per_tok", f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.norm_kind not in ("rms", "layernorm"):
            raise ConfigError("norm_kind", f"must be 'rms' or 'layernorm', got {self.norm_kind!r}")
        if self.qk_norm not in ("none", "head", "full"):
            raise ConfigError("qk_norm", f"must be 'none', 'head' or 'full', got {self.qk_norm!r}")
        if self.shared_expert_ffn_size < 0:
            raise ConfigError("shared_expert_intermediate_size", "must be >= 0")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ConfigError("clip_qkv", f"must be > 0 or null, got {self.clip_qkv!r}")
        if self.topk_norm_p is not None and not self.topk_norm_p > 0:
            raise ConfigError("topk_norm_p", f"must be > 0 or None, got {self.topk_norm_p!r}")

    @property
    def q_per_kv(self) -> int:
        """Query heads that share one KV head (the GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_ffn_size > 0

    def param_count(self) -> int:
        """Number of weights, for memory checks and reports."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + 2 * h + h * self.num_experts
        attn += (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        attn += {"none": 0, "head": 2 * self.head_dim, "full": q + kv}[self.qk_norm]
        attn += (3 * h * self.shared_expert_ffn_size + h * self.shared_expert_gated) * self.has_shared_expert
        experts = self.num_experts * 3 * h * self.expert_ffn_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        return self.num_layers * (attn + experts) + embed


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes of the engine: KV pages, batch limits and the per-step token budget."""

    page_size: int = 16
    num_pages: int = 512  # KV pages per layer; every sequence's pages come from this pool
    max_num_seqs: int = 16  # sequences in one step
    max_num_batched_tokens: int = 256  # tokens in one step; longer prompts are prefilled in chunks
    max_model_len: int | None = None  # prompt + output; default: the model's max_position_embeddings
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0  # seeds requests that bring none
    kernels: Literal["auto", "kernel", "reference", "interpret"] = "auto"  # auto: Pallas on Hopper GPUs

    def __post_init__(self):
        _check_positive(self, "page_size", "num_pages", "max_num_seqs", "max_num_batched_tokens")
        if self.kernels not in ("auto", "kernel", "reference", "interpret"):
            raise ConfigError("kernels", f"must be auto, kernel, reference or interpret, got {self.kernels!r}")
        if self.max_model_len is not None:
            _check_positive(self, "max_model_len")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError("dtype", f"must be 'float32' or 'bfloat16', got {self.dtype!r}")

    def resolved_max_model_len(self, model: ModelConfig) -> int:
        limit = model.max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ConfigError("max_model_len", f"{self.max_model_len} exceeds the model's context of {limit}")
        length = self.max_model_len or limit
        if self.num_pages * self.page_size < length:
            raise ConfigError("num_pages", f"{self.num_pages} pages of {self.page_size} tokens cannot hold one "
                              f"sequence of max_model_len={length}; raise num_pages or lower max_model_len")
        return length




def check_placement(placement: tuple[tuple[int, ...], ...], num_experts: int, expert_nodes: int,
                    lost: frozenset[int] | set[int] = frozenset()) -> None:
    """Every expert on at least one of the `expert_nodes` nodes, each node holding some, none twice; errors
    name the field. A plan's placement and every re-placement are checked here. Nodes `lost` (gone from a
    running deployment) must hold none."""
    if len(placement) != expert_nodes:
        raise ConfigError("placement", f"lists {len(placement)} expert nodes, the plan has {expert_nodes}")
    on_lost = sorted(node for node in lost if node < len(placement) and placement[node])
    if on_lost:
        raise ConfigError("placement", f"places experts on expert nodes {on_lost}, which are lost")
    if any(not node for i, node in enumerate(placement) if i not in lost):
        raise ConfigError("placement", "every expert node must hold at least one expert")
    held = {e for node in placement for e in node}
    outside = sorted(e for e in held if not 0 <= e < num_experts)
    if outside:
        raise ConfigError("placement", f"experts {outside} do not exist (the model has {num_experts})")
    missing = sorted(set(range(num_experts)) - held)
    if missing:
        raise ConfigError("placement", f"experts {missing} are on no expert node")
    for node in placement:
        if len(set(node)) != len(node):
            raise ConfigError("placement", f"an expert node lists an expert twice: {node}")


@dataclasses.dataclass(frozen=True)
class DeploymentPlan:
    """Where the model runs: attention replicated over data-parallel nodes, experts spread over expert nodes,
    tensor parallelism inside each node, and m micro-batches in flight (paper §3, §4).

    A plan is not tied to a model: `validate(model, num_devices)` checks it against both when a deployment is
    built. `DeploymentPlan.colocated(n)` spells the baseline that today's engines use: every module on the same
    n devices in one program (attention tensor-parallel, experts expert-parallel).
    """

    attention_nodes: int = 1  # n_a: data-parallel attention replicas, each with its own KV cache
    attention_tp: int = 1  # tp_a: devices per attention node
    expert_nodes: int = 1  # E: nodes that hold experts
    expert_tp: int = 1  # tp_e: devices per expert node
    micro_batches: int = 2  # m: micro-batches in flight per attention node
    max_batch: int | None = None  # global decode batch B; None lets the engine choose
    placement: tuple[tuple[int, ...], ...] | None = None  # experts held by each expert node; None: contiguous blocks
    transport: str = "auto"  # auto: every node in this process (msjax.comm.transports)
    attention_gpu: str | None = None  # hardware names the planner fills
    expert_gpu: str | None = None
    colocated_devices: int = 0  # > 0: the colocated baseline over this many devices
    # transport shm / tcp / rdma: every attention node a process of its own too (the engine's process then
    # only schedules); otherwise the engine's process holds the attention nodes
    attention_processes: bool = False
    # an expert node process that is lost is started again at once (it loads in the background while the others
    # serve its experts, and rejoins between steps once loaded); otherwise `NodeRunner.rejoin` does it on request
    restart_lost_experts: bool = False

    def __post_init__(self):
        _check_positive(self, "attention_nodes", "attention_tp", "expert_nodes", "expert_tp")
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ConfigError("micro_batches", f"must be an integer >= 1, got {self.micro_batches!r}")
        if self.max_batch is not None:
            _check_positive(self, "max_batch")
        if self.transport not in PLAN_TRANSPORTS:
            raise ConfigError("transport", f"must be one of {', '.join(PLAN_TRANSPORTS)}, got {self.transport!r}")
        if not isinstance(self.attention_processes, bool):
            raise ConfigError("attention_processes", f"must be true or false, got {self.attention_processes!r}")
        if not isinstance(self.restart_lost_experts, bool):
            raise ConfigError("restart_lost_experts", f"must be true or false, got {self.restart_lost_experts!r}")
        if not isinstance(self.colocated_devices, int) or self.colocated_devices < 0:
            raise ConfigError("colocated_devices", f"must be an integer >= 0, got {self.colocated_devices!r}")
        if self.placement is not None:
            placement = tuple(tuple(int(e) for e in node) for node in self.placement)
            if len(placement) != self.expert_nodes:
                raise ConfigError("placement", f"lists {len(placement)} expert nodes, the plan has "
                                  f"expert_nodes={self.expert_nodes}")
            if any(not node for node in placement):
                raise ConfigError("placement", "every expert node must hold at least one expert")
            object.__setattr__(self, "placement", placement)

    @classmethod
    def colocated(cls, devices: int = 1, micro_batches: int = 1) -> "DeploymentPlan":
        return cls(colocated_devices=devices, micro_batches=micro_batches)

    @property
    def is_colocated(self) -> bool:
        return self.colocated_devices > 0

    @property
    def num_replicas(self) -> int:
        """Attention replicas, each with its own KV pages and scheduler (one program: one)."""
        return 1 if self.is_colocated else self.attention_nodes

    @property
    def num_devices(self) -> int:
        if self.is_colocated:
            return self.colocated_devices
        return self.attention_nodes * self.attention_tp + self.expert_nodes * self.expert_tp

    def expert_placement(self, num_experts: int) -> tuple[tuple[int, ...], ...]:
        """Experts of each expert node: the explicit placement, or contiguous blocks whose sizes differ by at
        most one."""
        if self.placement is not None:
            return self.placement
        if self.expert_nodes > num_experts:
            raise ConfigError("expert_nodes", f"{self.expert_nodes} expert nodes for {num_experts} experts: "
                              "some nodes would hold none")
        bounds = [round(i * num_experts / self.expert_nodes) for i in range(self.expert_nodes + 1)]
        return tuple(tuple(range(bounds[i], bounds[i + 1])) for i in range(self.expert_nodes))

    def validate(self, model: ModelConfig, num_devices: int | None = None) -> None:
        """Check the plan against a model (and, given `num_devices`, the devices at hand); errors name the
        field. Where its nodes run is checked when a deployment resolves it (`msjax.runtime.deployment`)."""
        if num_devices is not None and self.num_devices > num_devices:
            raise ConfigError("plan", f"needs {self.num_devices} devices, only {num_devices} exist")
        if self.is_colocated:  # shards heads and experts where they divide, replicates the rest
            return
        kv = model.num_kv_heads
        if kv % self.attention_tp and self.attention_tp % kv:
            raise ConfigError("attention_tp", f"{self.attention_tp} neither divides the {kv} KV heads nor is a "
                              "multiple of them")
        if model.num_heads % self.attention_tp:
            raise ConfigError("attention_tp", f"{self.attention_tp} does not divide the {model.num_heads} "
                              "attention heads")
        if model.expert_ffn_size % self.expert_tp:
            raise ConfigError("expert_tp", f"{self.expert_tp} does not divide the expert FFN size "
                              f"{model.expert_ffn_size}")
        check_placement(self.expert_placement(model.num_experts), model.num_experts, self.expert_nodes)

    # --- TOML ---

    def to_toml(self) -> str:
        lines = ["[plan]"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or value == f.default:
                continue
            if isinstance(value, bool):
                lines.append(f"{f.name} = {str(value).lower()}")
            elif isinstance(value, str):
                lines.append(f'{f.name} = "{value}"')
            elif isinstance(value, tuple):
                lines.append(f"{f.name} = [{', '.join('[' + ', '.join(map(str, n)) + ']' for n in value)}]")
            else:
                lines.append(f"{f.name} = {value}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> "DeploymentPlan":
        import tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError("plan", f"not valid TOML ({err})") from None
        table = data.get("plan", data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown plan field; known: {', '.join(sorted(known))}")
        return cls(**table)

    @classmethod
    def load(cls, path) -> "DeploymentPlan":
        from pathlib import Path
        return cls.from_toml(Path(path).read_text())

    def save(self, path) -> None:
        from pathlib import Path
        Path(path).write_text(self.to_toml())
