"""Disaggregated expert parallelism over processes on one host (plans with transport "shm" or "tcp").

Every expert node is its own process (`msjax.runtime.expert_worker`, JAX on CPU) holding only its experts. The
attention nodes run in the engine's process, or with the plan's `attention_processes` each in a process of its
own too (`msjax.runtime.attention_worker`: its weights, its KV cache, its step program), the engine's process
then only scheduling. Packets and expert outputs move through the native M2N library's `m2n_send` / `m2n_recv`
custom calls inside the jitted programs on both sides: the attention program packs and sends, then receives and
combines; only valid rows travel.

Per step, attention node 0 first sends every expert node a small control message (JSON: per round, the active
attention nodes and their packet capacities), so the expert processes compile one program per shape and know
how many (layer, micro-batch) rounds follow. Each packet travels as bytes [capacity, hidden*itemsize + 4]: the
row, then its local expert id (int32). Attention processes get their step from the engine over an M2N control
channel of their own (pickled packed inputs, `node_inputs`; node 0's command also carries the expert nodes'
control message, which it sends ahead of its packets) and answer with the sampled tokens.

Rendezvous: the runner starts a JAX distributed runtime service (the coordination service behind
`jax.distributed`, used here only as a key-value store, without making the processes one JAX cluster); each
process publishes its receivers' addresses, reads the others', and everyone shuts the client down once the
endpoints are open.

Re-placement (`set_placement`, `Engine.rebalance`): between steps, a control message tells each changed expert
process which experts to hold; it loads them and answers on its back channel before the routing changes.

Tensor parallelism inside a node (tp_a, tp_e > 1): the node's program runs SPMD over its devices, with each
m2n call issued by its first device and what it receives given to all (`msjax.comm.node_calls.NodeM2N`).
Node processes run JAX on CPU (tp host devices each); on GPUs the attention nodes held by the engine's process
can use its devices.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msjax.comm.m2n import Routing
from msjax.config import DeploymentPlan, EngineConfig
from msjax.engine.batch import StepBatch
from msjax.errors import ConfigError
from msjax.kv_cache import AttentionBatch, KVCache
from msjax.models.layer_states import split_layers
from msjax.models.modules import AttentionRole
from msjax.models.programs import MoEModel
from msjax.runtime.disaggregated import attention_step, combine_step, embed_step, expert_subset, head_step
from msjax.runtime.sampler import Sampled

TRANSPORTS = ("shm", "tcp")


class WorkerError(RuntimeError):
    """An expert process failed to start, died, or broke the exchange."""


# -- packet bytes -----------------------------------------------------------------------------------------------

def row_bytes(hidden: int, dtype) -> int:
    return hidden * jnp.dtype(dtype).itemsize + 4


def pack_rows(rows: jax.Array, ids: jax.Array) -> jax.Array:
    """rows [cap, hidden] (any float dtype) and ids [cap] int32 -> uint8 [cap, hidden*itemsize + 4]."""
    cap = rows.shape[0]
    r = jax.lax.bitcast_convert_type(rows, jnp.uint8).reshape(cap, -1)
    i = jax.lax.bitcast_convert_type(ids.astype(jnp.int32), jnp.uint8).reshape(cap, 4)
    return jnp.concatenate([r, i], axis=1)


def unpack_rows(buf: jax.Array, hidden: int, dtype) -> tuple[jax.Array, jax.Array]:
    dtype = jnp.dtype(dtype)
    cap = buf.shape[0]
    nb = hidden * dtype.itemsize
    r = buf[:, :nb].reshape(cap, hidden, dtype.itemsize)
    rows = jax.lax.bitcast_convert_type(r if dtype.itemsize > 1 else r[..., 0], dtype)
    ids = jax.lax.bitcast_convert_type(buf[:, nb:].reshape(cap, 4), jnp.int32)
    return rows, ids


def pack_step_inputs(b: StepBatch) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """A micro-batch's step inputs as one int32 and one float32 array, and their layout (tokens, sequences,
    pages per sequence): two transfers to the device instead of ten, each with a fixed host cost (~0.1 ms on
    this project's CPU machine), on the host's critical path every step."""
    ints = np.concatenate([b.tokens, b.positions, b.seq_ids, b.page_table.ravel(), b.logit_rows, b.top_k, b.steps,
                           b.seeds.view(np.int32)])
    return ints, np.concatenate([b.temperature, b.top_p]), (len(b.tokens), len(b.logit_rows), b.page_table.shape[1])


def unpack_step_inputs(ints: jax.Array, floats: jax.Array, layout: tuple[int, int, int]) -> tuple:
    """Inside the step program: (tokens, AttentionBatch, logit_rows, temperature, top_p, top_k, seeds, steps)."""
    t, s, p = layout
    cuts = np.cumsum([t, t, t, s * p, s, s, s])
    tokens, positions, seq_ids, table, logit_rows, top_k, steps, seeds = jnp.split(ints, cuts)
    return (tokens, AttentionBatch(positions, seq_ids, table.reshape(s, p)), logit_rows, floats[:s], floats[s:],
            top_k, jax.lax.bitcast_convert_type(seeds, jnp.uint32), steps)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forget_failed_effects() -> None:
    """JAX keeps the last runtime token of every side-effecting computation for `effects_barrier` (and its atexit
    hook), which would re-raise the failed exchange at exit; the runner has reported it already."""
    try:
        from jax._src import dispatch
        dispatch.runtime_tokens.clear()
    except Exception:  # noqa: BLE001 - private API; only the noise at exit is at stake
        pass


_LIVE: "weakref.WeakSet[MultiProcessRunner]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for runner in list(_LIVE):
        runner.close()


def node_inputs(node: list[StepBatch]) -> dict:
    """Micro-batches `node` of one attention node as host arrays and the static arguments of its step program
    (what an attention process receives per step): inputs ((int32 [...], float32 [...]) per micro-batch),
    layouts, decodes, num_logprobs."""
    packed = [pack_step_inputs(b) for b in node]
    return dict(inputs=tuple((ints, floats) for ints, floats, _ in packed),
                layouts=tuple(layout for *_, layout in packed), decodes=tuple(b.decode for b in node),
                num_logprobs=tuple(b.num_logprobs for b in node))


def step_args(node: list[StepBatch], device, routing) -> dict:
    """The keyword arguments of an attention step program for micro-batches `node`, inputs on `device`."""
    args = node_inputs(node)
    return {**args, "inputs": jax.device_put(args["inputs"], device), "routing": routing}


def control_bytes(model_cfg, engine_config: EngineConfig, plan: DeploymentPlan) -> tuple[int, int]:
    """Capacities of the control channel to an attention process: its largest command (one step's packed inputs,
    `node_inputs`, for m micro-batches of the most tokens and sequences the engine schedules, with the expert
    nodes' control message and a routing table) and its largest reply (the sampled tokens of m micro-batches,
    logprobs included), each with room for pickle's framing."""
    from msjax.engine.sampling_params import MAX_LOGPROBS
    ec, m = engine_config, plan.micro_batches
    tokens, seqs = max(ec.max_num_batched_tokens, ec.max_num_seqs, 1), ec.max_num_seqs
    pages = -(-ec.resolved_max_model_len(model_cfg) // ec.page_size)
    per_micro_batch = 4 * (3 * tokens + seqs * (pages + 4)) + 8 * seqs  # int32 and float32 arrays
    slack = (1 << 16) + 64 * model_cfg.num_experts * plan.expert_nodes  # framing, control message, routing
    return m * per_micro_batch + slack, m * seqs * 8 * (1 + MAX_LOGPROBS) + slack


class AttentionStepProgram:
    """One attention node's decode/prefill step as one jitted program (`jitted(graphdef, layers, inputs, kv,
    token, load_total, **static)`), sending packets to the expert nodes through `tx` and receiving their
    outputs through `back`; `layers[l]` is the node's weights for layer l (`split_layers`). With a `mesh` of
    several devices (tensor parallelism inside the node) the program runs SPMD over them and each m2n call is
    issued by the first device only (`NodeM2N`). The runner calls it with the expert processes at the other end;
    the profiler with a loopback (`msjax.planner.profiler.measure_attention_program`)."""

    def __init__(self, cfg, tx, back, dtype, mesh=None):
        from msjax.comm.node_calls import NodeM2N
        self.cfg, self.tx, self.back, self.dtype = cfg, tx, back, jnp.dtype(dtype)
        self.m2n = NodeM2N(mesh)
        self.jitted = jax.jit(self._step_body(),
                              static_argnames=("graphdef", "layouts", "decodes", "num_logprobs", "routing"),
                              donate_argnames=("kv", "load_total"))

    def _send_body(self):
        """Attention of one (layer, micro-batch), then its packets to every expert node (m2n_send)."""
        tx, m2n = self.tx, self.m2n

        def send(graphdef, state, layer, micro_batch, h, moe, batch, kv, token, load_total, *, decode, routing):
            h, packets, orders, _, weights, load, kv = attention_step(graphdef, state, layer, h, moe, batch, kv,
                                                                      decode=decode, routing=routing)
            for e, p in enumerate(packets):  # each send after the previous m2n call
                token = m2n.send(pack_rows(p.rows, p.expert_ids), p.count, tx, receiver=e, layer=layer,
                                 micro_batch=micro_batch, after=token)
            return h, orders, weights, load_total + load, kv, token
        return send

    def _recv_body(self):
        """The expert outputs of one (layer, micro-batch) back from every expert node (m2n_recv_all), combined."""
        rx, hidden, dtype, m2n = self.back, self.cfg.hidden_size, self.dtype, self.m2n

        def recv(layer, micro_batch, orders, weights, token):
            # one call for every expert node (after the previous m2n call), their outputs taken as they come
            likes = [jax.ShapeDtypeStruct((order.shape[0], hidden), dtype) for order in orders]
            outs, counts = m2n.recv_all(rx, senders=list(range(len(orders))), likes=likes, layer=layer,
                                        micro_batch=micro_batch, after=token)
            return combine_step(tuple(outs), orders, weights), counts[-1]
        return recv

    def _step_body(self):
        """A whole decode/prefill step of the attention node as one program: embedding, every (layer, micro-batch)
        in ping-pong order with its m2n sends and receives, the last combine, LM heads and sampling.

        One host call per step instead of one per (layer, micro-batch): on the attention node's core (or GPU host
        thread) Python dispatch was the bottleneck once the m2n calls ran inside the programs. The order is the
        ping-pong order of paper §4.1 — the combine of (layer - 1, i), then the attention and send of (layer, i),
        so the attention of micro-batch i+1 runs while the experts hold micro-batch i — and XLA keeps it: every
        m2n call is chained to the previous one through `token`."""
        send, recv = self._send_body(), self._recv_body()
        num_layers = self.cfg.num_layers

        def step(graphdef, layers, inputs, kv, token, load_total, *, layouts, decodes, num_logprobs, routing):
            # layers[l]: the node's weights for layer l (the shared ones, embeddings and LM head, in each)
            # inputs[i] = (int32 [...], float32 [2 s_i]) as packed by pack_step_inputs; unpacked, inputs[i] =
            # (tokens [t_i], AttentionBatch, logit_rows, temperature, top_p, top_k, seeds, steps)
            inputs = tuple(unpack_step_inputs(ints, floats, layout) for (ints, floats), layout in zip(inputs, layouts))
            m = len(inputs)
            h = [embed_step(graphdef, layers[0], x[0]) for x in inputs]  # [t_i, hidden] each
            moe = [jnp.zeros_like(x) for x in h]
            sent = [None] * m  # (orders, weights) of the last send of each micro-batch
            for layer in range(num_layers):
                for i in range(m):
                    if layer > 0:
                        moe[i], token = recv(layer - 1, i, *sent[i], token)
                    else:  # this attention after the previous micro-batch's send: without the order XLA may run
                        # every layer-0 attention first and hold the sends back, idling the expert nodes
                        h[i], token = jax.lax.optimization_barrier((h[i], token))
                    h[i], orders, weights, load_total, kv, token = send(
                        graphdef, layers[layer], layer, i, h[i], moe[i], inputs[i][1], kv, token, load_total,
                        decode=decodes[i], routing=routing)
                    # the next micro-batch writes the cache only after this one's attention has read it: without
                    # the order XLA may schedule that write first and copy the whole cache to keep this read
                    kv, h[i] = jax.lax.optimization_barrier((kv, h[i]))
                    sent[i] = (orders, weights)
            sampled = []
            for i in range(m):  # micro-batch i's LM head and sampling while the experts finish micro-batch i+1
                moe[i], token = recv(num_layers - 1, i, *sent[i], token)
                out = head_step(graphdef, layers[0], h[i], moe[i], *inputs[i][2:], num_logprobs=num_logprobs[i])
                out, token = jax.lax.optimization_barrier((out, token))  # before the next receive
                sampled.append(out)
            return tuple(sampled), kv, token, load_total
        return step


class AttentionNode:
    """One attention node on its devices (tensor-parallel over them when several: heads and KV heads sharded as
    in the in-process runtime, `ATTENTION_TP_RULES`): its weights (one state per layer, `split_layers`), KV
    cache, expert-load counter, the token that orders its m2n calls, and its `AttentionStepProgram` sending on
    `tx` and receiving on `back`. The runner holds one per node in the engine's process, or an attention process
    holds it (`msjax.runtime.attention_worker`)."""

    def __init__(self, cfg, engine_config: EngineConfig, graphdef, state, devices: list, tx, back, dtype):
        from jax.sharding import Mesh

        from msjax.models import sharding
        self.cfg, self.graphdef = cfg, graphdef
        mesh = Mesh(np.array(devices), ("tp",))
        self.replicated = sharding.replicated(mesh)
        # each layer's weights as their own arrays: the step program runs every layer, and slicing a stacked
        # array inside it made XLA copy each layer's weights
        self.layers = split_layers(sharding.shard_state(state, sharding.ATTENTION_TP_RULES, mesh), cfg.num_layers,
                                   AttentionRole.SHARED_PARAMS)
        ec = engine_config
        shape = (cfg.num_layers * ec.num_pages, ec.page_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv = KVCache.create(cfg, ec.num_pages, ec.page_size, dtype=dtype,
                                 sharding=sharding.kv_sharding(shape, sharding.ATTENTION_TP_RULES, mesh))
        # [num_experts] tokens routed per expert since the last read, added to inside the step program
        self.load = jax.device_put(jnp.zeros(cfg.num_experts, jnp.int32), self.replicated)
        self.token = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
        self.program = AttentionStepProgram(cfg, tx, back, dtype, mesh)

    def _args(self, inputs: dict, routing) -> dict:
        return {**inputs, "inputs": jax.device_put(inputs["inputs"], self.replicated), "kv": self.kv,
                "token": self.token, "load_total": self.load, "routing": routing}

    def step(self, inputs: dict, routing) -> tuple:
        """Runs one step (`node_inputs`), enqueued without waiting -> Sampled per micro-batch, on the device."""
        out, self.kv, self.token, self.load = self.program.jitted(self.graphdef, self.layers,
                                                                  **self._args(inputs, routing))
        return out

    def lower(self, inputs: dict, routing, *, compiled: bool = False) -> str:
        lowered = self.program.jitted.lower(self.graphdef, self.layers, **self._args(inputs, routing))
        return lowered.compile().as_text() if compiled else lowered.as_text()

    def read_load(self) -> np.ndarray:
        """[num_experts] tokens routed per expert since the last read."""
        load, self.load = np.asarray(self.load), jnp.zeros_like(self.load)
        return load


class MultiProcessRunner:
    """`run(batches) -> sampled` like `DisaggregatedRunner`, with each expert node in its own process, and with
    the plan's `attention_processes` each attention node too: the engine's process then only schedules,
    sending each attention node its step's inputs and reading back the sampled tokens over the same M2N library
    (a control channel beside the data path), while the nodes exchange packets directly.

    `checkpoint`: an HF checkpoint directory the workers read their weights from; without it the runner hands
    them the model's weights (a temporary file). Use as a context manager or call `close()`."""

    def __init__(self, model: MoEModel, cfg: EngineConfig, plan: DeploymentPlan, devices=None, *,
                 checkpoint: str | os.PathLike | None = None, timeout_s: float = 60.0,
                 startup_timeout_s: float = 120.0, python: str | None = None):
        if plan.transport not in TRANSPORTS:
            raise ConfigError("transport", f"the multi-process runner needs 'shm' or 'tcp', got {plan.transport!r}")
        if plan.is_colocated:
            raise ConfigError("plan", "a colocated plan has no expert nodes to put in processes")
        plan.validate(model.cfg, plan.num_devices)  # devices: at most the attention nodes live here
        self.attention_processes = plan.attention_processes
        devices = list(devices if devices is not None else jax.devices())
        need = plan.attention_nodes * plan.attention_tp
        if not self.attention_processes and len(devices) < need:
            raise ConfigError("plan", f"needs {need} devices for attention here, {len(devices)} exist")
        if (not self.attention_processes and plan.attention_nodes > 1 and plan.attention_tp > 1
                and devices[0].platform == "cpu"):
            # XLA:CPU launches one program with collectives at a time per process: node 1's step would wait for
            # node 0's to finish, and node 0's waits on expert outputs that need node 1's packets
            raise ConfigError("attention_processes", f"{plan.attention_nodes} attention nodes with attention_tp = "
                              f"{plan.attention_tp} cannot share one process on CPU (XLA:CPU runs one program with "
                              "collectives at a time, and each node's step waits on the others' packets): set "
                              "attention_processes = true")
        self.cfg, self.plan, self.engine_config = model.cfg, plan, cfg
        # where re-placed experts come from: the workers read the checkpoint, or the runner hands them weights
        self._checkpoint, self._model = (str(checkpoint), None) if checkpoint else (None, model)
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        self.closed = False
        self.procs: list[subprocess.Popen] = []  # expert node e's process
        self.attention_procs: list[subprocess.Popen] = []  # attention node a's process (attention_processes)
        self.nodes: list[AttentionNode] = []  # the attention nodes held here (not attention_processes)
        self._tmp = tempfile.mkdtemp(prefix="msjax-mp-")
        self._service = self._client = None
        self.tx, self.back = [], []  # attention nodes held here: their endpoints to the expert nodes
        self._ctl = self._res = None  # attention processes: the control channel to them and their replies
        _LIVE.add(self)
        try:
            self._start(model, devices, checkpoint, python or sys.executable)
        except BaseException:
            self.close()
            raise

    # -- start-up ---------------------------------------------------------------------------------------------

    def _start(self, model, devices, checkpoint, python):
        from jax._src.lib import _jax

        from msjax.comm import native
        plan, mcfg, ec = self.plan, model.cfg, self.engine_config
        n_a, n_e = plan.attention_nodes, plan.expert_nodes
        self.placement = plan.expert_placement(mcfg.num_experts)
        self.routing = Routing.from_placement(self.placement, mcfg.num_experts)
        self.dtype = jnp.dtype(model.dtype)
        self.max_tokens = max(ec.max_num_batched_tokens, ec.max_num_seqs, 1)
        cap = self.max_tokens * mcfg.top_k
        dispatch_bytes = max(cap * row_bytes(mcfg.hidden_size, self.dtype), 1 << 16)
        back_bytes = cap * mcfg.hidden_size * self.dtype.itemsize
        self.channel = f"mp{uuid.uuid4().hex[:10]}"

        def address(tag: str) -> str:  # shm: a channel name shared by its receivers; tcp: bind any port
            return f"{self.channel}-{tag}" if plan.transport == "shm" else "127.0.0.1:0"

        remote = self.attention_processes
        coordinator = f"127.0.0.1:{_free_port()}"
        self._service = _jax.get_distributed_runtime_service(coordinator, 1 + n_e + (n_a if remote else 0),
                                                             shutdown_timeout=5)
        prefix = f"msjax/{self.channel}"
        common = dict(channel=self.channel, transport=plan.transport, config=mcfg, dtype=self.dtype.name,
                      coordinator=coordinator, prefix=prefix, timeout_s=self.timeout_s,
                      startup_timeout_s=self.startup_timeout_s, attention_nodes=n_a, expert_nodes=n_e,
                      dispatch_address=address("d"), dispatch_bytes=dispatch_bytes, back_address=address("b"),
                      back_bytes=back_bytes, checkpoint=str(checkpoint) if checkpoint else None)
        kernels = getattr(nnx.merge(model.expert_def, model.expert_state), "kernels", None)
        for e, experts in enumerate(self.placement):
            spec = dict(common, node=e, client_id=1 + e, expert_ids=experts, kernels=kernels, tp=plan.expert_tp)
            if not checkpoint:
                _, state = expert_subset(model, experts)
                spec["leaves"] = [np.asarray(x) for x in jax.tree.leaves(state)]
            self.procs.append(self._spawn("expert", e, spec, python))
        if remote:
            self.ctl_bytes, self.res_bytes = control_bytes(mcfg, ec, plan)
            kernels = getattr(nnx.merge(model.attention_def, model.attention_state), "kernels", None)
            leaves = None if checkpoint else [np.asarray(x) for x in jax.tree.leaves(model.attention_state)]
            for a in range(n_a):
                spec = dict(common, node=a, client_id=1 + n_e + a, engine_config=ec, routing=self.routing,
                            kernels=kernels, tp=plan.attention_tp, ctl_address=address("c"), ctl_bytes=self.ctl_bytes,
                            res_address=address("f"), res_bytes=self.res_bytes, leaves=leaves)
                self.attention_procs.append(self._spawn("attention", a, spec, python))
            self._node_routing = [self.routing] * n_a  # the routing each attention process holds
            # receivers first (tcp binds here), then publish, then wait for the others'
            self._res = native.Receiver(plan.transport, address("f"), 0, n_a, self.res_bytes,
                                        timeout_s=self.timeout_s)
            found = self._rendezvous(coordinator, {f"{prefix}/res": self._res.address},
                                     [f"{prefix}/ctl/{a}" for a in range(n_a)])
        else:
            self.back = [native.Receiver(plan.transport, address("b"), a, n_e, back_bytes, timeout_s=self.timeout_s)
                         for a in range(n_a)]
            found = self._rendezvous(coordinator, {f"{prefix}/back/{a}": rx.address for a, rx in enumerate(self.back)},
                                     [f"{prefix}/dispatch/{e}" for e in range(n_e)])
        # opening a sender waits for every receiver (tcp connects here)
        try:
            if remote:
                self._ctl = native.Sender(plan.transport, found, 0, self.ctl_bytes, timeout_s=self.timeout_s)
            else:
                self.tx = [native.Sender(plan.transport, found, a, dispatch_bytes, timeout_s=self.timeout_s)
                           for a in range(n_a)]
        except native.M2NError as err:
            self._check_workers("while connecting")
            raise WorkerError(f"cannot reach the node processes: {err}" + self._logs()) from err
        # every node has opened its senders: the key-value store is no longer needed
        self._await_keys([f"{prefix}/ready/{e}" for e in range(n_e)]
                         + [f"{prefix}/ready-attention/{a}" for a in range(n_a) if remote])
        self._stop_coordination()
        if not remote:
            tp = plan.attention_tp  # node a: devices [a tp, (a + 1) tp)
            self.nodes = [AttentionNode(mcfg, ec, model.attention_def, model.attention_state,
                                        devices[a * tp:(a + 1) * tp], self.tx[a], self.back[a], self.dtype)
                          for a in range(n_a)]

    def _spawn(self, kind: str, index: int, spec: dict, python: str) -> subprocess.Popen:
        """Starts `python -m msjax.runtime.{kind}_worker` for node `index` (JAX on CPU, as many devices as the
        node's tp), its spec in a file."""
        path = Path(self._tmp) / f"{kind}{index}.pkl"
        path.write_bytes(pickle.dumps(spec))
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        if spec["tp"] > 1:
            flags.append(f"--xla_force_host_platform_device_count={spec['tp']}")
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "XLA_FLAGS": " ".join(flags)}
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
        with open(Path(self._tmp) / f"{kind}{index}.log", "wb") as log:
            return subprocess.Popen([python, "-m", f"msjax.runtime.{kind}_worker", "--spec", str(path)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)

    def _rendezvous(self, coordinator: str, publish: dict[str, str], wanted: list[str]) -> list[str]:
        """Publishes `publish` in the key-value store of the coordination service at `coordinator` and returns
        the values of `wanted` (the node processes' addresses), failing fast when a node process exits."""
        from jax._src.lib import _jax
        errors: list = []  # missed heartbeats: reported through the failing calls below
        self._client = _jax.get_distributed_runtime_client(
            coordinator, 0, init_timeout=int(self.startup_timeout_s), shutdown_timeout=5,
            shutdown_on_destruction=False, missed_heartbeat_callback=lambda *a: errors.append(a))
        box: dict = {}

        def exchange():
            try:
                self._client.connect()
                for key, value in publish.items():
                    self._client.key_value_set(key, value)
                ms = int(self.startup_timeout_s * 1000)
                box["found"] = [self._client.blocking_key_value_get(key, ms) for key in wanted]
            except Exception as err:  # noqa: BLE001 - reported below
                box["error"] = err

        thread = threading.Thread(target=exchange, daemon=True)
        thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while thread.is_alive():
            self._check_workers("while starting")
            if time.monotonic() > deadline:
                raise WorkerError(f"node processes did not start within {self.startup_timeout_s:.0f} s"
                                  + self._logs())
            thread.join(0.1)
        if "error" in box:
            self._check_workers("while starting")
            raise WorkerError(f"rendezvous failed: {box['error']}" + self._logs())
        return box["found"]

    def _await_keys(self, keys: list[str]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        for key in keys:
            while True:
                self._check_workers("while starting")
                try:
                    self._client.blocking_key_value_get(key, 200)
                    break
                except Exception:  # noqa: BLE001 - not yet
                    if time.monotonic() > deadline:
                        raise WorkerError(f"{key.rsplit('/', 2)[-2:]} did not get ready" + self._logs()) from None

    def _stop_coordination(self) -> None:
        client, service, self._client, self._service = self._client, self._service, None, None
        for obj in (client, service):
            if obj is not None:
                try:
                    obj.shutdown()
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass

    def _workers(self):
        """(name, log file, process) of every node process."""
        for kind, procs in (("expert", self.procs), ("attention", self.attention_procs)):
            for i, p in enumerate(procs):
                yield f"{kind} node {i}", Path(self._tmp) / f"{kind}{i}.log", p

    def _logs(self, lines: int = 30) -> str:
        out = []
        for name, path, p in self._workers():
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"\n--- {name} (pid {p.pid}) log tail ---\n" + "\n".join(tail))
        return "".join(out)

    def _check_workers(self, when: str) -> None:
        for name, _, p in self._workers():
            if p.poll() is not None:
                raise WorkerError(f"{name} (pid {p.pid}) exited with code {p.returncode} {when}" + self._logs())

    # -- the attention processes' control channel -------------------------------------------------------------

    def _command(self, a: int, command: dict, timeout_s: float = -1) -> None:
        data = pickle.dumps(command)
        if len(data) > self.ctl_bytes:
            raise ValueError(f"a control message of {len(data)} bytes for attention node {a} exceeds the channel's "
                             f"{self.ctl_bytes}")
        self._ctl.send(a, data, timeout_s=timeout_s)

    def _reply(self, a: int) -> dict:
        """Attention node a's answer to its last command. Waits while every node process lives (a step's first
        call compiles), for at most startup + exchange timeout; an error the node reports is raised here."""
        from msjax.comm import native
        deadline = time.monotonic() + self.startup_timeout_s + self.timeout_s
        while True:
            try:
                with native.thread_poll_us(0):  # a step-long wait: sleep, leave the core to the node processes
                    reply = pickle.loads(self._res.recv(a, timeout_s=1.0))
                break
            except native.M2NTimeout:
                self._check_workers("during the step")
                if time.monotonic() > deadline:
                    raise WorkerError(f"attention node {a} did not answer within "
                                      f"{self.startup_timeout_s + self.timeout_s:.0f} s") from None
        if "error" in reply:
            raise RuntimeError(f"attention node {a}: {reply['error']}")
        return reply

    # -- programs ---------------------------------------------------------------------------------------------

    def _local(self, a: int) -> AttentionNode:
        if self.attention_processes:
            raise RuntimeError("the attention nodes run in their own processes (the plan's attention_processes)")
        return self.nodes[a]

    def _step_program(self, a: int):
        """Attention node a's jitted step program (`AttentionStepProgram`): one compile per step signature."""
        return self._local(a).program.jitted

    def lower_attention(self, node: list[StepBatch], a: int = 0, *, compiled: bool = False) -> str:
        """HLO text of attention node a's step program for the micro-batches `node` (it holds the custom calls):
        as lowered, or with `compiled` as XLA scheduled it (the order the node runs it in)."""
        return self._local(a).lower(node_inputs(node), self.routing, compiled=compiled)

    # -- the step ---------------------------------------------------------------------------------------------

    @property
    def expert_meshes(self) -> list[None]:
        """One entry per expert node (their devices live in other processes); what `Engine.rebalance` counts."""
        return [None] * len(self.procs)

    def _to_experts(self, messages: list[tuple[int, bytes]], replies: list[int] = ()) -> list[bytes]:
        """Control messages to expert nodes on attention node 0's dispatch channel (between steps, or ahead of a
        step's packets), then the answers of expert nodes `replies` on its back channel."""
        layer = self.cfg.num_layers  # control messages carry a layer no packet has
        if self.attention_processes:
            self._command(0, {"control": messages, "replies": list(replies)})
            return self._reply(0).get("replies", [])
        for e, message in messages:
            self.tx[0].send(e, message, layer=layer, micro_batch=0)
        return [self.back[0].recv(e, layer=layer, micro_batch=0) for e in replies]

    def set_placement(self, placement, shares=None) -> None:
        """Re-place the experts between steps (`Engine.rebalance`): each expert process whose experts change
        loads them (from the checkpoint, or from a file of weights the runner writes) and acknowledges before
        routing changes. If a node cannot load, the nodes that did are put back and the runner keeps its old
        placement (a clear error); requests in flight are untouched either way (their KV caches live in the
        attention nodes)."""
        if self.closed:
            raise WorkerError("the multi-process runner is closed")
        placement = tuple(tuple(int(x) for x in node) for node in placement)
        if len(placement) != len(self.procs):
            raise ValueError(f"placement lists {len(placement)} nodes, the plan has {len(self.procs)}")
        routing = Routing.from_placement(placement, self.cfg.num_experts, shares)  # validates the placement
        self._check_workers("before re-placing experts")
        changed = {e: node for e, node in enumerate(placement) if node != self.placement[e]}
        errors = self._place(changed)
        if errors:
            undo = {e: self.placement[e] for e in changed if e not in errors}
            if self._place(undo):
                self.close()
                raise WorkerError("expert nodes could not return to their experts after a failed re-placement: "
                                  + "; ".join(f"node {e}: {m}" for e, m in errors.items()))
            raise ConfigError("placement", "; ".join(f"expert node {e} cannot load {list(changed[e])}: {m}"
                                                     for e, m in errors.items()))
        self.placement, self.routing = placement, routing

    def _place(self, nodes: dict[int, tuple[int, ...]]) -> dict[int, str]:
        """Tells expert node e to hold experts nodes[e] and waits for each answer. -> {node: error}."""
        messages = []
        for e, experts in nodes.items():
            message = {"place": list(experts)}
            if self._checkpoint is None:  # the worker has no checkpoint to read: hand it the weights
                _, state = expert_subset(self._model, experts)
                path = Path(self._tmp) / f"place{e}.pkl"
                path.write_bytes(pickle.dumps([np.asarray(x) for x in jax.tree.leaves(state)]))
                message["leaves"] = str(path)
            messages.append((e, json.dumps(message).encode()))
        try:
            replies = self._to_experts(messages, list(nodes))
        except Exception as err:  # noqa: BLE001 - a dead or silent worker: the runner cannot go on
            self._check_workers("while re-placing experts")
            self.close()
            raise WorkerError(f"expert nodes {list(nodes)} did not answer the re-placement: {err}"
                              + self._logs()) from err
        return {e: reply["error"] for e, reply in zip(nodes, (json.loads(r.decode()) for r in replies))
                if "error" in reply}

    def read_expert_load(self) -> np.ndarray:
        """[num_experts] tokens routed per expert over every attention node since the last read."""
        if self.closed:
            raise WorkerError("the multi-process runner is closed")
        if self.attention_processes:
            try:
                for a in range(len(self.attention_procs)):
                    self._command(a, {"load": True})
                return sum(self._reply(a)["load"] for a in range(len(self.attention_procs)))
            except Exception as err:
                self._fail(err)
        return sum(node.read_load() for node in self.nodes)

    def run(self, batches: list[list[StepBatch]]) -> list[list[Sampled]]:
        if self.closed:
            raise WorkerError("the multi-process runner is closed")
        try:
            self._check_workers("before the step")
        except WorkerError as err:  # a node is gone: the deployment cannot step again
            self._fail(err)
        if not any(batches):
            return [[] for _ in batches]
        k = self.cfg.top_k
        rounds = max(len(node) for node in batches)
        control = []
        for i in range(rounds):
            caps = []
            for a, node in enumerate(batches):
                if i < len(node):
                    tokens = int(node[i].tokens.shape[0])
                    if tokens > self.max_tokens:
                        raise ValueError(f"a micro-batch of {tokens} tokens exceeds the runner's {self.max_tokens}")
                    caps.append([a, tokens * k])
            control.append(caps)
        message = json.dumps({"rounds": control}).encode()
        try:
            if self.attention_processes:
                return self._run_processes(batches, message)
            self._to_experts([(e, message) for e in range(len(self.procs))])
            return self._run(batches)
        except Exception as err:
            self._fail(err)

    def _fail(self, err: Exception):
        """A step (or a read of the attention processes) failed: the deployment cannot go on. Closes every
        process and raises a WorkerError naming the nodes that died, with their log tails."""
        if isinstance(err, WorkerError):  # already names the node
            self.close()
            _forget_failed_effects()
            raise err
        time.sleep(0.2)  # let a dying worker finish dying, to name it
        dead = [(name, p.returncode) for name, _, p in self._workers() if p.poll() is not None]
        logs = self._logs()
        self.close()
        _forget_failed_effects()
        what = (f"{', '.join(n for n, _ in dead)} exited (codes {[c for _, c in dead]})" if dead
                else "the exchange between the node processes failed")
        raise WorkerError(f"{what}: {err}" + logs) from err

    def _run(self, batches):
        # Every attention node's step is one program, enqueued without waiting: JAX dispatch is asynchronous, so
        # the nodes' programs run at once (each on its own device) and the expert nodes see every active node's
        # packets of a round, as they expect.
        sampled = [node.step(node_inputs(b), self.routing) if b else () for node, b in zip(self.nodes, batches)]
        return [list(x) for x in jax.tree.map(np.asarray, sampled)]  # the step's one sync

    def _run_processes(self, batches, message: bytes):
        # Every attention process gets its command before any reply is read, so they run their steps at once;
        # node 0's carries the expert nodes' control message, which it sends ahead of its packets.
        busy = []
        for a, node in enumerate(batches):
            command: dict = {"control": [(e, message) for e in range(len(self.procs))]} if a == 0 else {}
            if node:
                command["step"] = node_inputs(node)
                if self._node_routing[a] is not self.routing:  # changed by set_placement since its last step
                    command["routing"] = self._node_routing[a] = self.routing
            if command:
                self._command(a, command)
                busy.append(a)
        replies = {a: self._reply(a) for a in busy}
        return [list(replies[a]["sampled"]) if node else [] for a, node in enumerate(batches)]

    # -- shutdown ---------------------------------------------------------------------------------------------

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the node processes (a stop message, then kill), close the endpoints, remove shm segments.
        Idempotent."""
        if self.closed:
            return
        self.closed = True
        _LIVE.discard(self)
        procs = [p for _, _, p in self._workers()]
        if all(p.poll() is None for p in procs) and (self.tx or self._ctl is not None):
            stop = json.dumps({"stop": True}).encode()
            try:
                if self._ctl is not None:  # attention node 0 stops the expert nodes, then every node stops
                    for a in range(len(self.attention_procs)):
                        self._command(a, {"control": [(e, stop) for e in range(len(self.procs))] if a == 0 else [],
                                          "stop": True}, timeout_s=1.0)
                else:
                    for e in range(len(self.procs)):
                        self.tx[0].send(e, stop, layer=self.cfg.num_layers, micro_batch=0, timeout_s=1.0)
            except Exception:  # noqa: BLE001 - killed below
                pass
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ep in (*self.tx, *self.back, self._ctl, self._res):
            try:
                if ep is not None:
                    ep.close()
            except Exception:  # noqa: BLE001
                pass
        self._stop_coordination()
        channel = getattr(self, "channel", None)
        if channel:
            for seg in Path("/dev/shm").glob(f"msjax-m2n-{channel}-*"):
                try:
                    seg.unlink()
                except OSError:
                    pass
        if os.environ.get("MSJAX_KEEP_WORKER_LOGS") is None:
            import shutil
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
