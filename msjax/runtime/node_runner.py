"""The runner of a disaggregated deployment: attention nodes and expert nodes as services (`msjax.runtime.nodes`),
each in this process (`LocalHost`) or in a process of its own (`msjax.runtime.node_process`), driven by the
typed requests of `msjax.runtime.protocol`, exchanging packets over the plan's native transport.

One step: every expert node gets `ExpertStep` (what each round holds), every busy attention node
`AttentionStep` (its micro-batches, packed); the nodes exchange packets among themselves from inside their
programs; the runner reads each attention node's `StepDone` (the sampled tokens) and each expert node's.

Start-up: a rendezvous (in memory when every node is here, else a TCP one: `msjax.comm.rendezvous`) through
which every party publishes its receivers' addresses and reads its peers' (`msjax.comm.endpoints`); node
processes are started first (they load their weights meanwhile), then the nodes held here open, then everyone
connects.

Failure: a node process that exits, a step that fails, a node that does not answer: the deployment is closed
(every process stopped) and a WorkerError names the node, with the log tails of the processes.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
import time
import uuid
import weakref
from pathlib import Path

import jax
import numpy as np

from msjax.comm import wire
from msjax.comm.endpoints import BIND_HOST, key, node_endpoints, runner_endpoints
from msjax.comm.m2n import Routing
from msjax.config import check_placement
from msjax.errors import ConfigError
from msjax.runtime import protocol as p
from msjax.runtime import step_inputs
from msjax.runtime.deployment import Deployment, channel_sizes
from msjax.runtime.hosts import LocalHost, ProcessLinks, WorkerError
from msjax.runtime.nodes import AttentionNode, ExpertNode
from msjax.runtime.processes import NodeProcess, NodeProcesses
from msjax.runtime.runner import NodeHealth, RunnerHealth

_LIVE: "weakref.WeakSet[NodeRunner]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for runner in list(_LIVE):
        runner.close()


class NodeRunner:
    """`Runner` over attention and expert nodes (`deployment` says where each runs). `checkpoint`: the HF
    directory node processes read their weights from; without it they get files of theirs from `model`."""

    def __init__(self, model, deployment: Deployment, *, checkpoint=None, timeout_s: float = 60.0,
                 startup_timeout_s: float = 120.0, python: str | None = None):
        self.deployment, self.cfg, self.model = deployment, model.cfg, model
        plan = deployment.plan
        self.placement = plan.expert_placement(model.cfg.num_experts)
        self.shares = None
        self.checkpoint = str(checkpoint) if checkpoint else None
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        self.run_name = f"mp{uuid.uuid4().hex[:10]}"
        self.local = LocalHost()
        self.processes = NodeProcesses()
        self.links: ProcessLinks | None = None
        self.closed = False
        self._step = 0
        self._server = self._runner_endpoints = None
        self._tmp = Path(tempfile.mkdtemp(prefix="msjax-run-"))
        _LIVE.add(self)
        try:
            self._start(python)
        except BaseException:
            self.close()
            raise

    # -- start-up ---------------------------------------------------------------------------------------------

    @property
    def attention_keys(self) -> list[tuple[str, int]]:
        return [("attention", a) for a in range(self.deployment.plan.attention_nodes)]

    @property
    def expert_keys(self) -> list[tuple[str, int]]:
        return [("expert", e) for e in range(self.deployment.plan.expert_nodes)]

    def _start(self, python) -> None:
        from msjax.comm.rendezvous import LocalRendezvous
        d, cfg = self.deployment, self.cfg
        remote = ([k for k in self.attention_keys if d.attention_processes]
                  + [k for k in self.expert_keys if d.expert_processes])
        token = secrets.token_hex(16)
        if remote:
            from msjax.comm.rendezvous import RendezvousClient, RendezvousServer
            self._server = RendezvousServer(host=BIND_HOST, token=token)
            rendezvous = RendezvousClient(self._server.address, token=token, timeout_s=self.startup_timeout_s)
        else:
            rendezvous = LocalRendezvous()
        sizes = channel_sizes(cfg, d, np.dtype(self.model.dtype).itemsize)
        self.topology = p.Topology(
            run=self.run_name, transport=d.transport, rendezvous=self._server.address if remote else "",
            token=token, attention_nodes=d.plan.attention_nodes, expert_nodes=d.plan.expert_nodes,
            depth=d.ring_depth, dispatch_bytes=sizes.dispatch, back_bytes=sizes.back, control_bytes=sizes.control,
            reply_bytes=sizes.reply, timeout_s=self.timeout_s, startup_timeout_s=self.startup_timeout_s)
        try:
            for role, index in remote:  # first: they load their weights while the rest starts
                self.processes.add(NodeProcess(self._spec(role, index), self._tmp, python))
            alive = lambda: self.processes.check("while starting")  # noqa: E731
            here = [k for k in self.attention_keys + self.expert_keys if k not in remote]
            endpoints = {k: node_endpoints(self.topology, rendezvous, *k, remote=False) for k in here}
            if remote:
                self._runner_endpoints = runner_endpoints(self.topology, rendezvous, remote)
            for ep in [*endpoints.values(), *filter(None, [self._runner_endpoints])]:
                ep.connect(alive)
            for (role, index), ep in endpoints.items():
                self.local.add((role, index), self._local_node(role, index, ep))
            if remote:
                rendezvous.get_many([key(self.run_name, "ready", *k) for k in remote], self.startup_timeout_s,
                                    alive=alive)
                ep = self._runner_endpoints
                self.links = ProcessLinks({k: ep.senders[f"control/{k[0]}/{k[1]}"] for k in remote},
                                          {k: ep.receivers[f"reply/{k[0]}/{k[1]}"] for k in remote},
                                          self.processes.check, self.startup_timeout_s + self.timeout_s)
        except WorkerError:
            raise
        except Exception as err:
            if any(True for _ in self.processes.dead()):
                self.processes.check("while starting")
            raise WorkerError(f"the deployment did not start: {type(err).__name__}: {err}"
                              + self.processes.logs()) from err
        finally:
            rendezvous.close()

    def _spec(self, role: str, index: int) -> p.NodeSpec:
        """What node process (role, index) starts with; its weights from the checkpoint or a file of them."""
        d = self.deployment
        weights = None
        if self.checkpoint is None:
            state = (self.model.attention_state if role == "attention"
                     else self.model.expert_subset(self.placement[index])[1])
            weights = str(self._write_weights(state, f"{role}{index}-start"))
        return p.NodeSpec(role=role, index=index, model=self.cfg, engine=d.engine, dtype=np.dtype(self.model.dtype).name,
                          kernels=self.model.kernels, tp=d.plan.attention_tp if role == "attention" else d.plan.expert_tp,
                          platform=d.platform, placement=self.placement, topology=self.topology,
                          checkpoint=self.checkpoint, weights=weights, device_ids=d.device_ids.get((role, index), ()))

    def _write_weights(self, state, name: str) -> Path:
        path = self._tmp / f"{name}.weights"
        path.write_bytes(wire.encode(p.Weights(tuple(np.asarray(x) for x in jax.tree.leaves(state)))))
        return path

    def _local_node(self, role: str, index: int, endpoints):
        d, m = self.deployment, self.model
        if role == "attention":
            return AttentionNode(index, self.cfg, d.engine, m.attention_def, m.attention_state,
                                 d.attention_devices[index], endpoints, self.placement, m.dtype)
        return ExpertNode(index, self.cfg, self.placement[index], d.expert_devices[index], endpoints, m.dtype,
                          lambda experts, _file: m.expert_subset(experts))

    # -- requests -----------------------------------------------------------------------------------------------

    def _submit(self, node_key, request) -> None:
        if node_key in self.local:
            self.local.submit(node_key, request)
        else:
            self.links.submit(node_key, request)

    def _reply(self, node_key, expect):
        reply = self.local.reply(node_key) if node_key in self.local else self.links.reply(node_key)
        if isinstance(reply, p.Failed):
            raise RuntimeError(f"{node_key[0]} node {node_key[1]}: {reply.error}")
        if not isinstance(reply, expect):
            raise WorkerError(f"{node_key[0]} node {node_key[1]} answered {type(reply).__name__}, expected "
                              f"{expect.__name__}")
        return reply

    def _ask(self, node_keys, request, expect) -> list:
        """`request` to every node of `node_keys` (all first, so they work at once), then their replies."""
        for k in node_keys:
            self._submit(k, request)
        return [self._reply(k, expect) for k in node_keys]

    def _check_open(self) -> None:
        if self.closed:
            raise WorkerError("the deployment is closed (a node failed, or close() was called)")

    # -- the Runner protocol ----------------------------------------------------------------------------------

    def step(self, batches):
        self._check_open()
        if len(batches) != len(self.attention_keys):
            raise ValueError(f"{len(batches)} attention nodes' batches for a plan of {len(self.attention_keys)}")
        if not any(batches):
            return [[] for _ in batches]
        try:
            self.processes.check("before the step")
            tokens = max(int(mb.tokens.shape[0]) for node in batches for mb in node)
            if tokens > self.deployment.max_tokens:
                raise ValueError(f"a micro-batch of {tokens} tokens exceeds the deployment's "
                                 f"{self.deployment.max_tokens}")
            # every packet of the step gets the capacity of its largest (a receive may be larger than what is
            # sent): an expert node's program then depends on which attention nodes send in each round and on
            # that one capacity, not on every combination of the attention nodes' shapes (which a server could
            # neither compile ahead nor avoid meeting one by one)
            cap = tokens * self.cfg.top_k
            rounds = [tuple((a, cap) for a, node in enumerate(batches) if i < len(node))
                      for i in range(max(len(node) for node in batches))]
            self._step += 1
            busy = [a for a, node in enumerate(batches) if node]
            for e in self.expert_keys:
                self._submit(e, p.ExpertStep(self._step, tuple(rounds)))
            for a in busy:
                self._submit(("attention", a),
                             p.AttentionStep(self._step, tuple(step_inputs.pack(b) for b in batches[a])))
            done = {a: self._reply(("attention", a), p.StepDone) for a in busy}
            for e in self.expert_keys:
                self._reply(e, p.StepDone)
        except Exception as err:  # noqa: BLE001 - any failure mid-step leaves the channels out of step
            self._fail(err)
        return [list(done[a].sampled) if a in done else [] for a in range(len(batches))]

    def expert_load(self) -> np.ndarray:
        self._check_open()
        try:
            return sum(r.tokens for r in self._ask(self.attention_keys, p.ReadLoad(), p.Load))
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    def set_placement(self, placement, shares=None) -> None:
        """Each expert node whose experts change loads them (from the checkpoint, or a file the runner writes)
        and answers before any routing changes; then every attention node routes by the new placement. If a
        node cannot load, the nodes that did go back and the old placement stays (a ConfigError); requests in
        flight are untouched either way (their KV caches live on the attention nodes)."""
        self._check_open()
        placement = tuple(tuple(int(x) for x in node) for node in placement)
        check_placement(placement, self.cfg.num_experts, len(self.expert_keys))
        Routing.from_placement(placement, self.cfg.num_experts, shares)  # the shares fit the placement
        changed = {e: experts for e, experts in enumerate(placement) if experts != self.placement[e]}
        try:
            errors = self._place(changed)
            if errors:
                undo = {e: self.placement[e] for e in changed if e not in errors}
                if self._place(undo):
                    raise WorkerError("expert nodes could not return to their experts after a failed "
                                      "re-placement: " + "; ".join(f"node {e}: {m}" for e, m in errors.items()))
                raise ConfigError("placement", "; ".join(errors.values()))
            shares = None if shares is None else tuple(tuple(float(s) for s in node) for node in shares)
            self._ask(self.attention_keys, p.SetRouting(placement, shares), p.Ok)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001
            self._fail(err)
        self.placement, self.shares = placement, shares

    def _place(self, nodes: dict[int, tuple[int, ...]]) -> dict[int, str]:
        """Tells expert node e to hold experts nodes[e]; waits for every answer. -> {node: error}."""
        for e, experts in nodes.items():
            weights = None
            if ("expert", e) not in self.local and self.checkpoint is None:
                weights = str(self._write_weights(self.model.expert_subset(experts)[1], f"place{e}"))
            self._submit(("expert", e), p.Place(experts, weights))
        replies = {e: (self.local.reply(("expert", e)) if ("expert", e) in self.local
                       else self.links.reply(("expert", e))) for e in nodes}
        return {e: r.error for e, r in replies.items() if isinstance(r, p.Failed)}

    def health(self) -> RunnerHealth:
        nodes = [NodeHealth(role, index, "local", os.getpid(), not self.closed) for role, index in self.local.nodes]
        nodes += [NodeHealth(proc.role, proc.index, "process", proc.pid, proc.alive()) for proc in self.processes]
        dead = [f"{n.role} node {n.index}" for n in nodes if not n.alive and n.where == "process"]
        detail = "closed" if self.closed else (f"{', '.join(dead)} exited" if dead else "")
        return RunnerHealth(not detail, detail, tuple(sorted(nodes, key=lambda n: (n.role, n.index))))

    def attach_timeline(self, timeline) -> None:
        for node in self.local.nodes.values():
            node.timeline = timeline

    # -- what tests and benchmarks look at ----------------------------------------------------------------------

    def node(self, role: str, index: int):
        """Node (role, index) if this process holds it."""
        return self.local.nodes[role, index]

    def record_traffic(self, on: bool = True) -> None:
        """Record, on the attention nodes held here, what every (layer, micro-batch) routed and sent."""
        for (role, _), node in self.local.nodes.items():
            if role == "attention":
                node.traffic = [] if on else None

    @property
    def traffic(self) -> list[dict]:
        return [t for (role, _), node in self.local.nodes.items() if role == "attention" for t in node.traffic or ()]

    # -- failure and shutdown -------------------------------------------------------------------------------------

    def _fail(self, err: Exception):
        """A step (or a read, or a re-placement) failed: the deployment cannot go on. Closes everything and
        raises a WorkerError naming the node processes that died, with their log tails."""
        if isinstance(err, WorkerError):
            self.close()
            raise err
        time.sleep(0.2)  # let a dying node process finish dying, to name it
        dead = self.processes.dead()
        logs = self.processes.logs()
        self.close()
        what = ("; ".join(f"{proc.name} (pid {proc.pid}) exited with code {proc.returncode}" for proc in dead)
                if dead else "the exchange between the nodes failed")
        raise WorkerError(f"{what}: {err}" + logs) from err

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop every node (a Stop request, then a kill), close the endpoints, remove shared memory and the
        run's files. Idempotent."""
        if self.closed:
            return
        self.closed = True
        _LIVE.discard(self)
        if self.links is not None:
            for proc in self.processes:
                if proc.alive():
                    try:
                        self.links.submit((proc.role, proc.index), p.Stop(), timeout_s=1.0)
                    except Exception:  # noqa: BLE001 - it is killed below
                        pass
        self.processes.stop(timeout_s)
        self.local.close()
        for closable in (self._runner_endpoints, self._server):
            if closable is not None:
                try:
                    closable.close()
                except Exception:  # noqa: BLE001 - on the way out
                    pass
        for segment in Path("/dev/shm").glob(f"msjax-m2n-{self.run_name}-*"):
            segment.unlink(missing_ok=True)
        if os.environ.get("MSJAX_KEEP_WORKER_LOGS") is None:
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

