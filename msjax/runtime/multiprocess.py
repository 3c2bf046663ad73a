"""Disaggregated expert parallelism over processes on one host (plans with transport "shm" or "tcp").

The engine's process runs the attention node(s); every expert node is its own process
(`msjax.runtime.expert_worker`, JAX on CPU) holding only its experts. Packets and expert outputs move through
the native M2N library's `m2n_send` / `m2n_recv` custom calls inside the jitted programs on both sides: the
attention program packs and sends, the combine program receives and sums; only valid rows travel.

Per step, attention node 0 first sends every expert node a small control message (JSON: per round, the active
attention nodes and their packet capacities), so the expert processes compile one program per shape and know
how many (layer, micro-batch) rounds follow. Each packet travels as bytes [capacity, hidden*itemsize + 4]: the
row, then its local expert id (int32).

Rendezvous: the runner starts a JAX distributed runtime service (the coordination service behind
`jax.distributed`, used here only as a key-value store, without making the processes one JAX cluster); the
engine publishes its receivers' addresses, each worker its own, and everyone shuts the client down once the
endpoints are open.

Re-placement (`set_placement`, `Engine.rebalance`): between steps, a control message tells each changed expert
process which experts to hold; it loads them and answers on its back channel before the routing changes.

Limits of this first slice: tp_a = tp_e = 1 (a sharded program would issue the custom calls once per device),
CPU only.
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


def step_args(node: list[StepBatch], device, routing) -> dict:
    """The keyword arguments of an attention step program for micro-batches `node`, inputs on `device`."""
    packed = [pack_step_inputs(b) for b in node]
    return dict(inputs=jax.device_put(tuple((ints, floats) for ints, floats, _ in packed), device),
                layouts=tuple(layout for *_, layout in packed), decodes=tuple(b.decode for b in node),
                num_logprobs=tuple(b.num_logprobs for b in node), routing=routing)


class AttentionStepProgram:
    """One attention node's decode/prefill step as one jitted program (`jitted(graphdef, layers, inputs, kv,
    token, load_total, **static)`), sending packets to the expert nodes through `tx` and receiving their
    outputs through `back`; `layers[l]` is the node's weights for layer l (`split_layers`). The runner calls it
    with the expert processes at the other end; the profiler with a loopback
    (`msjax.planner.profiler.measure_attention_program`)."""

    def __init__(self, cfg, tx, back, dtype):
        self.cfg, self.tx, self.back, self.dtype = cfg, tx, back, jnp.dtype(dtype)
        self.jitted = jax.jit(self._step_body(),
                              static_argnames=("graphdef", "layouts", "decodes", "num_logprobs", "routing"),
                              donate_argnames=("kv", "load_total"))

    def _send_body(self):
        """Attention of one (layer, micro-batch), then its packets to every expert node (m2n_send)."""
        from msjax.comm import native
        tx = self.tx

        def send(graphdef, state, layer, micro_batch, h, moe, batch, kv, token, load_total, *, decode, routing):
            h, packets, orders, _, weights, load, kv = attention_step(graphdef, state, layer, h, moe, batch, kv,
                                                                      decode=decode, routing=routing)
            for e, p in enumerate(packets):  # each send after the previous m2n call
                token = native.m2n_send(pack_rows(p.rows, p.expert_ids), p.count, tx, receiver=e, layer=layer,
                                        micro_batch=micro_batch, after=token)
            return h, orders, weights, load_total + load, kv, token
        return send

    def _recv_body(self):
        """The expert outputs of one (layer, micro-batch) back from every expert node (m2n_recv_all), combined."""
        from msjax.comm import native
        rx, hidden, dtype = self.back, self.cfg.hidden_size, self.dtype

        def recv(layer, micro_batch, orders, weights, token):
            # one call for every expert node (after the previous m2n call), their outputs taken as they come
            likes = [jax.ShapeDtypeStruct((order.shape[0], hidden), dtype) for order in orders]
            outs, counts = native.m2n_recv_all(rx, senders=list(range(len(orders))), likes=likes, layer=layer,
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


class MultiProcessRunner:
    """`run(batches) -> sampled` like `DisaggregatedRunner`, with each expert node in its own process.

    `checkpoint`: an HF checkpoint directory the workers read their experts from; without it the runner hands
    them the model's expert weights (a temporary file). Use as a context manager or call `close()`."""

    def __init__(self, model: MoEModel, cfg: EngineConfig, plan: DeploymentPlan, devices=None, *,
                 checkpoint: str | os.PathLike | None = None, timeout_s: float = 60.0,
                 startup_timeout_s: float = 120.0, python: str | None = None):
        if plan.transport not in TRANSPORTS:
            raise ConfigError("transport", f"the multi-process runner needs 'shm' or 'tcp', got {plan.transport!r}")
        if plan.is_colocated:
            raise ConfigError("plan", "a colocated plan has no expert nodes to put in processes")
        if plan.attention_tp != 1 or plan.expert_tp != 1:
            raise ConfigError("plan", "multi-process deployment supports attention_tp = expert_tp = 1 so far")
        plan.validate(model.cfg, plan.num_devices)  # devices: only the attention nodes live here
        devices = list(devices if devices is not None else jax.devices())
        if len(devices) < plan.attention_nodes:
            raise ConfigError("plan", f"needs {plan.attention_nodes} devices for attention, {len(devices)} exist")
        self.cfg, self.plan, self.engine_config = model.cfg, plan, cfg
        # where re-placed experts come from: the workers read the checkpoint, or the runner hands them weights
        self._checkpoint, self._model = (str(checkpoint), None) if checkpoint else (None, model)
        self.closed = False
        self.procs: list[subprocess.Popen] = []
        self._tmp = tempfile.mkdtemp(prefix="msjax-mp-")
        self._service = self._client = None
        self.tx, self.back = [], []
        _LIVE.add(self)
        try:
            self._start(model, devices, checkpoint, timeout_s, startup_timeout_s, python or sys.executable)
        except BaseException:
            self.close()
            raise

    # -- start-up ---------------------------------------------------------------------------------------------

    def _start(self, model, devices, checkpoint, timeout_s, startup_timeout_s, python):
        from jax._src.lib import _jax

        from msjax.comm import native
        plan, mcfg = self.plan, model.cfg
        n_a, n_e = plan.attention_nodes, plan.expert_nodes
        self.devices = devices[:n_a]
        self.placement = plan.expert_placement(mcfg.num_experts)
        self.routing = Routing.from_placement(self.placement, mcfg.num_experts)
        self.dtype = jnp.dtype(model.dtype)
        self.hidden = mcfg.hidden_size
        self.max_tokens = max(self.engine_config.max_num_batched_tokens, self.engine_config.max_num_seqs, 1)
        cap = self.max_tokens * mcfg.top_k
        dispatch_bytes = max(cap * row_bytes(self.hidden, self.dtype), 1 << 16)
        back_bytes = cap * self.hidden * self.dtype.itemsize
        self.channel = f"mp{uuid.uuid4().hex[:10]}"
        local = "127.0.0.1:0"
        dispatch_address = f"{self.channel}-d" if plan.transport == "shm" else local
        back_address = f"{self.channel}-b" if plan.transport == "shm" else local

        # attention side state, as DisaggregatedRunner, one device per node
        self.attention_def = model.attention_def
        # each layer's weights as their own arrays (split_layers): the step program runs every layer, and slicing
        # a stacked array inside it made XLA copy each layer's weights
        self.attention_layers = [split_layers(jax.device_put(model.attention_state, d), mcfg.num_layers,
                                              AttentionRole.SHARED_PARAMS) for d in self.devices]
        ec = self.engine_config
        self.kv = [jax.device_put(KVCache.create(mcfg, ec.num_pages, ec.page_size, dtype=model.dtype), d)
                   for d in self.devices]
        # [num_experts] tokens routed per expert since the last read, one counter per attention node on its
        # device, added to inside the send program (no eager op or transfer per layer)
        self._loads = [jax.device_put(jnp.zeros(mcfg.num_experts, jnp.int32), d) for d in self.devices]
        kernels = getattr(nnx.merge(model.expert_def, model.expert_state), "kernels", None)

        port = _free_port()
        coordinator = f"127.0.0.1:{port}"
        self._service = _jax.get_distributed_runtime_service(coordinator, n_e + 1, shutdown_timeout=5)
        prefix = f"msjax/{self.channel}"
        for e, experts in enumerate(self.placement):
            spec = dict(node=e, channel=self.channel, attention_nodes=n_a, transport=plan.transport, config=mcfg,
                        expert_ids=experts, dtype=self.dtype.name, kernels=kernels, coordinator=coordinator,
                        prefix=prefix, timeout_s=timeout_s, startup_timeout_s=startup_timeout_s,
                        dispatch_address=dispatch_address, dispatch_bytes=dispatch_bytes, back_bytes=back_bytes,
                        checkpoint=str(checkpoint) if checkpoint else None)
            if not checkpoint:
                _, state = expert_subset(model, experts)
                spec["leaves"] = [np.asarray(x) for x in jax.tree.leaves(state)]
            path = Path(self._tmp) / f"worker{e}.pkl"
            path.write_bytes(pickle.dumps(spec))
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                   "XLA_FLAGS": " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                         if "host_platform_device_count" not in f)}
            root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
            log = open(Path(self._tmp) / f"worker{e}.log", "wb")
            self.procs.append(subprocess.Popen([python, "-m", "msjax.runtime.expert_worker", "--spec", str(path)],
                                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                               env=env, start_new_session=True))
            log.close()

        # receivers first (tcp binds here), then publish, then wait for the workers'
        self.back = [native.Receiver(plan.transport, back_address, a, n_e, back_bytes, timeout_s=timeout_s)
                     for a in range(n_a)]
        errors: list = []  # missed heartbeats: reported through the failing calls below
        self._client = _jax.get_distributed_runtime_client(
            coordinator, 0, init_timeout=int(startup_timeout_s), shutdown_timeout=5, shutdown_on_destruction=False,
            missed_heartbeat_callback=lambda *a: errors.append(a))
        box: dict = {}

        def rendezvous():
            try:
                self._client.connect()
                for a, rx in enumerate(self.back):
                    self._client.key_value_set(f"{prefix}/back/{a}", rx.address)
                ms = int(startup_timeout_s * 1000)
                box["dispatch"] = [self._client.blocking_key_value_get(f"{prefix}/dispatch/{e}", ms)
                                   for e in range(n_e)]
            except Exception as err:  # noqa: BLE001 - reported below
                box["error"] = err

        thread = threading.Thread(target=rendezvous, daemon=True)
        thread.start()
        deadline = time.monotonic() + startup_timeout_s
        while thread.is_alive():
            self._check_workers("while starting")
            if time.monotonic() > deadline:
                raise WorkerError(f"expert processes did not start within {startup_timeout_s:.0f} s"
                                  + self._logs())
            thread.join(0.1)
        if "error" in box:
            self._check_workers("while starting")
            raise WorkerError(f"rendezvous failed: {box['error']}" + self._logs())
        # opening a sender waits for every receiver (tcp connects here)
        try:
            self.tx = [native.Sender(plan.transport, box["dispatch"], a, dispatch_bytes, timeout_s=timeout_s)
                       for a in range(n_a)]
        except native.M2NError as err:
            self._check_workers("while connecting")
            raise WorkerError(f"cannot reach the expert processes: {err}" + self._logs()) from err
        for e in range(n_e):  # every worker has opened its back sender: the key-value store is no longer needed
            while True:
                self._check_workers("while starting")
                try:
                    self._client.blocking_key_value_get(f"{prefix}/ready/{e}", 200)
                    break
                except Exception:  # noqa: BLE001 - not yet
                    if time.monotonic() > deadline:
                        raise WorkerError(f"expert node {e} did not get ready" + self._logs()) from None
        self._stop_coordination()
        self._programs: dict = {}  # attention node -> its AttentionStepProgram
        self._tokens = [jnp.zeros((), jnp.int32, device=d) for d in self.devices]

    def _stop_coordination(self) -> None:
        client, service, self._client, self._service = self._client, self._service, None, None
        for obj in (client, service):
            if obj is not None:
                try:
                    obj.shutdown()
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass

    def _logs(self, lines: int = 30) -> str:
        out = []
        for e in range(len(self.procs)):
            path = Path(self._tmp) / f"worker{e}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"\n--- expert node {e} (pid {self.procs[e].pid}) log tail ---\n" + "\n".join(tail))
        return "".join(out)

    def _check_workers(self, when: str) -> None:
        for e, p in enumerate(self.procs):
            if p.poll() is not None:
                raise WorkerError(f"expert node {e} (pid {p.pid}) exited with code {p.returncode} {when}"
                                  + self._logs())

    # -- programs ---------------------------------------------------------------------------------------------

    def _step_program(self, a: int):
        """Attention node a's jitted step program (`AttentionStepProgram`): one compile per step signature."""
        if a not in self._programs:
            self._programs[a] = AttentionStepProgram(self.cfg, self.tx[a], self.back[a], self.dtype)
        return self._programs[a].jitted

    def _step_args(self, a: int, node: list[StepBatch]):
        return step_args(node, self.devices[a], self.routing)

    def lower_attention(self, node: list[StepBatch], a: int = 0, *, compiled: bool = False) -> str:
        """HLO text of attention node a's step program for the micro-batches `node` (it holds the custom calls):
        as lowered, or with `compiled` as XLA scheduled it (the order the node runs it in)."""
        lowered = self._step_program(a).lower(self.attention_def, self.attention_layers[a], kv=self.kv[a],
                                              token=self._tokens[a], load_total=self._loads[a],
                                              **self._step_args(a, node))
        return lowered.compile().as_text() if compiled else lowered.as_text()

    # -- the step ---------------------------------------------------------------------------------------------

    @property
    def expert_meshes(self) -> list[None]:
        """One entry per expert node (their devices live in other processes); what `Engine.rebalance` counts."""
        return [None] * len(self.procs)

    def set_placement(self, placement, shares=None) -> None:
        """Re-place the experts between steps (`Engine.rebalance`): each expert process whose experts change
        loads them (from the checkpoint, or from a file of weights the runner writes) and acknowledges before
        routing changes. If a node cannot load, the nodes that did are put back and the runner keeps its old
        placement (a clear error); requests in flight are untouched either way (their KV caches live here)."""
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
        """Tells expert node e to hold experts nodes[e] (a control message on the dispatch channel, between
        steps) and waits for each answer on its back channel to attention node 0. -> {node: error}."""
        for e, experts in nodes.items():
            message = {"place": list(experts)}
            if self._checkpoint is None:  # the worker has no checkpoint to read: hand it the weights
                _, state = expert_subset(self._model, experts)
                path = Path(self._tmp) / f"place{e}.pkl"
                path.write_bytes(pickle.dumps([np.asarray(x) for x in jax.tree.leaves(state)]))
                message["leaves"] = str(path)
            self.tx[0].send(e, json.dumps(message).encode(), layer=self.cfg.num_layers, micro_batch=0)
        errors = {}
        for e in nodes:
            try:
                reply = json.loads(self.back[0].recv(e, layer=self.cfg.num_layers, micro_batch=0).decode())
            except Exception as err:  # noqa: BLE001 - a dead or silent worker: the runner cannot go on
                self._check_workers("while re-placing experts")
                self.close()
                raise WorkerError(f"expert node {e} did not answer the re-placement: {err}" + self._logs()) from err
            if "error" in reply:
                errors[e] = reply["error"]
        return errors

    def read_expert_load(self) -> np.ndarray:
        load = sum(np.asarray(x) for x in self._loads)
        self._loads = [jnp.zeros_like(x) for x in self._loads]
        return load

    def run(self, batches: list[list[StepBatch]]) -> list[list[Sampled]]:
        if self.closed:
            raise WorkerError("the multi-process runner is closed")
        self._check_workers("before the step")
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
            for e in range(len(self.procs)):
                self.tx[0].send(e, message, layer=self.cfg.num_layers, micro_batch=0)
            return self._run(batches)
        except WorkerError:
            raise
        except Exception as err:
            time.sleep(0.2)  # let a dying worker finish dying, to name it
            dead = [(e, p.returncode) for e, p in enumerate(self.procs) if p.poll() is not None]
            logs = self._logs()
            self.close()
            _forget_failed_effects()
            what = (f"expert nodes {[e for e, _ in dead]} exited (codes {[c for _, c in dead]})" if dead
                    else "the exchange with the expert processes failed")
            raise WorkerError(f"{what}: {err}" + logs) from err

    def _run(self, batches):
        # Every attention node's step is one program, enqueued without waiting: JAX dispatch is asynchronous, so
        # the nodes' programs run at once (each on its own device) and the expert nodes see every active node's
        # packets of a round, as they expect.
        sampled = []
        for a, node in enumerate(batches):
            if not node:
                sampled.append(())
                continue
            out, self.kv[a], self._tokens[a], self._loads[a] = self._step_program(a)(
                self.attention_def, self.attention_layers[a], kv=self.kv[a], token=self._tokens[a],
                load_total=self._loads[a], **self._step_args(a, node))
            sampled.append(out)
        return [list(x) for x in jax.tree.map(np.asarray, sampled)]  # the step's one sync

    # -- shutdown ---------------------------------------------------------------------------------------------

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the workers (a stop message, then kill), close the endpoints, remove shm segments. Idempotent."""
        if self.closed:
            return
        self.closed = True
        _LIVE.discard(self)
        if self.tx and all(p.poll() is None for p in self.procs):
            stop = json.dumps({"stop": True}).encode()
            for e in range(len(self.procs)):
                try:
                    self.tx[0].send(e, stop, layer=self.cfg.num_layers, micro_batch=0, timeout_s=1.0)
                except Exception:  # noqa: BLE001 - killed below
                    pass
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ep in (*self.tx, *self.back):
            try:
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
