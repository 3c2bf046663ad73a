"""A deployment plan resolved once against the model, the engine's limits and this machine (`resolve`): what
every part that builds or sizes a deployment reads instead of deciding again (the engine's batch limits, the
runner's node placement and devices, every channel's capacity, the kernel choice).
"""

from __future__ import annotations

import dataclasses

from msjax.comm import transports
from msjax.config import MAX_LOGPROBS, DeploymentPlan, EngineConfig, ModelConfig
from msjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Deployment:
    """`plan` as it runs here. For a disaggregated plan: attention node a on `attention_devices[a]` (empty when
    it is a process), expert node e on `expert_devices[e]` (likewise); `device_ids` the GPU ordinals each node
    process gets (empty on CPU)."""

    plan: DeploymentPlan
    engine: EngineConfig  # max_num_seqs per attention node, as the plan's max_batch asks
    transport: str  # the native M2N transport; "" for a colocated plan (one program, no nodes)
    platform: str  # "cpu", "gpu", ...: where this process's devices are, and where node processes run
    devices: tuple  # colocated: the program's devices
    attention_devices: tuple[tuple, ...] = ()
    expert_devices: tuple[tuple, ...] = ()
    device_ids: dict = dataclasses.field(default_factory=dict)  # (role, index) -> GPU ordinals of a node process

    @property
    def is_colocated(self) -> bool:
        return not self.transport

    @property
    def num_replicas(self) -> int:
        return self.plan.num_replicas

    @property
    def micro_batches(self) -> int:
        return self.plan.micro_batches

    @property
    def attention_processes(self) -> bool:
        return not self.is_colocated and not self.attention_devices

    @property
    def expert_processes(self) -> bool:
        return not self.is_colocated and not self.expert_devices

    @property
    def max_tokens(self) -> int:
        """The most tokens one micro-batch holds (a decode step has one per sequence)."""
        return max(self.engine.max_num_batched_tokens, self.engine.max_num_seqs, 1)

    @property
    def ring_depth(self) -> int:
        """Slots per sender on the packet channels: every micro-batch of a layer in flight, and one more."""
        return self.plan.micro_batches + 1


def engine_limits(config: EngineConfig, plan: DeploymentPlan | None) -> EngineConfig:
    """The engine's limits under `plan`: its max_batch (the global decode batch) split over the attention nodes."""
    if plan is None or plan.max_batch is None:
        return config
    return dataclasses.replace(config, max_num_seqs=-(-plan.max_batch // plan.num_replicas))


def _platform(devices) -> str:
    return devices[0].platform if devices else "cpu"


def resolve(model: ModelConfig, engine: EngineConfig, plan: DeploymentPlan | None = None,
            devices=None) -> Deployment:
    """Validate `plan` against the model, the engine's limits and this machine, and decide where each node runs
    and on which devices. Errors are ConfigErrors naming the field."""
    import jax
    devices = tuple(devices if devices is not None else jax.devices())
    plan = plan or DeploymentPlan.colocated(1, micro_batches=1)
    engine = engine_limits(engine, plan)
    engine.resolved_max_model_len(model)  # pages hold a sequence, the model's context holds max_model_len
    _check_kernels(engine.kernels, devices)
    platform = _platform(devices)
    if plan.attention_processes and (plan.is_colocated or transports.is_in_process(plan.transport)):
        raise ConfigError("attention_processes", "puts nodes in processes: it needs a disaggregated plan with "
                          f"transport 'shm', 'tcp' or 'rdma', got transport {plan.transport!r}")
    if plan.restart_lost_experts and (plan.is_colocated or transports.is_in_process(plan.transport)):
        raise ConfigError("restart_lost_experts", "restarts expert node processes: it needs a disaggregated plan "
                          f"with transport 'shm', 'tcp' or 'rdma', got transport {plan.transport!r}")
    if plan.is_colocated:
        plan.validate(model, len(devices))
        return Deployment(plan, engine, "", platform, devices[:plan.colocated_devices])
    plan.validate(model)
    native = transports.native_transport(plan.transport)
    in_process = transports.is_in_process(plan.transport)
    tp_a, tp_e = plan.attention_tp, plan.expert_tp
    local_attention = 0 if plan.attention_processes else plan.attention_nodes
    local_experts = plan.expert_nodes if in_process else 0
    need = local_attention * tp_a + local_experts * tp_e
    if need > len(devices):
        where = "" if in_process else " in this process (the expert nodes are processes)"
        raise ConfigError("plan", f"needs {need} devices{where}, only {len(devices)} exist")
    cut = local_attention * tp_a
    attention = tuple(devices[a * tp_a:(a + 1) * tp_a] for a in range(local_attention))
    experts = tuple(devices[cut + e * tp_e:cut + (e + 1) * tp_e] for e in range(local_experts))
    return Deployment(plan, engine, native, platform, devices[:need], attention, experts,
                      _process_device_ids(plan, platform, devices, need, local_attention, local_experts))


def _process_device_ids(plan, platform, devices, used, local_attention, local_experts) -> dict:
    """GPU ordinals for each node process, after the devices this process's nodes use; on CPU none (each node
    process forces its own host devices)."""
    if platform == "cpu":
        return {}
    nodes = [("attention", a, plan.attention_tp) for a in range(local_attention, plan.attention_nodes)]
    nodes += [("expert", e, plan.expert_tp) for e in range(local_experts, plan.expert_nodes)]
    total = used + sum(tp for *_, tp in nodes)
    if total > len(devices):
        raise ConfigError("plan", f"needs {total} {platform} devices on this host, {len(devices)} exist")
    ids, next_device = {}, used
    for role, index, tp in nodes:
        ids[role, index] = tuple(int(d.local_hardware_id) for d in devices[next_device:next_device + tp])
        next_device += tp
    return ids


def _check_kernels(kernels: str, devices) -> None:
    """"kernel" insists on the Pallas kernels: they need a Hopper GPU (else "interpret" runs them on any host)."""
    if kernels != "kernel":
        return
    from pallas_kernels.platform import is_hopper
    if not devices or not is_hopper(devices[0]):
        raise ConfigError("kernels", f"'kernel' needs a Hopper GPU (wgmma, TMA); this process has "
                          f"{devices[0].platform if devices else 'no'} devices: use 'auto' (the kernels where they "
                          "apply), 'reference', or 'interpret' (the kernels in the Mosaic GPU interpreter)")


@dataclasses.dataclass(frozen=True)
class ChannelSizes:
    """Bytes of the largest message on each channel of a deployment, from the engine's limits."""

    dispatch: int  # one packet: every row of the largest micro-batch, top-k times
    back: int  # the expert outputs for one packet
    control: int  # the largest request to a node (an attention step of m of the largest micro-batches)
    reply: int  # the largest reply (m micro-batches of sampled tokens with top logprobs)


# msgpack framing of a message: field names, type tags, array headers (dtype, shape) — generous
_FRAMING = 1 << 14


def channel_sizes(model: ModelConfig, deployment: Deployment, itemsize: int) -> ChannelSizes:
    ec, m = deployment.engine, deployment.micro_batches
    tokens, seqs = deployment.max_tokens, ec.max_num_seqs
    rows = tokens * model.top_k
    pages = -(-ec.resolved_max_model_len(model) // ec.page_size)
    per_micro_batch = 4 * (3 * tokens + seqs * (pages + 4)) + 8 * seqs + 256  # int32 + float32 arrays, layout
    return ChannelSizes(dispatch=max(rows * (model.hidden_size * itemsize + 4), 1 << 16),
                        back=rows * model.hidden_size * itemsize,
                        # an attention step, or a SetRouting naming every expert on every node with its share
                        control=max(m * per_micro_batch, 16 * model.num_experts * deployment.plan.expert_nodes)
                        + _FRAMING,
                        reply=m * (seqs * 8 * (1 + MAX_LOGPROBS) + 256) + _FRAMING)
