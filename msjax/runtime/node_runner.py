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

Losing an expert node (its process exits, or its channel fails mid-step): the attention nodes' endpoints are
tolerant (`msjax.runtime.nodes`), so their programs run to the end of the step with the lost node's outputs as
zeros and keep every KV cache; the runner takes the node out of the placement (`msjax.runtime.faults`: experts
with a live replica are re-routed to it, the others loaded onto live nodes), tells every attention node the new
routing, and runs the step again: its KV writes land on the same positions, so the outputs are those of a run
without the fault. Losing the last expert node, or an attention node (its KV cache goes with it), or a step that
fails any other way: the deployment is closed (every process stopped) and a WorkerError names the node, with
the log tails of the processes.
"""

from __future__ import annotations

import atexit
import dataclasses
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

from msjax.comm import native, wire
from msjax.comm.endpoints import BIND_HOST, channel_run, key, node_endpoints, packet_endpoints, runner_endpoints
from msjax.comm.m2n import Routing
from msjax.config import check_placement
from msjax.errors import ConfigError
from msjax.runtime import protocol as p
from msjax.runtime import step_inputs
from msjax.runtime.deployment import Deployment, channel_sizes
from msjax.runtime.faults import FaultStats, degrade, rebuilt_experts
from msjax.runtime.hosts import LocalHost, NodeLost, ProcessLinks, WorkerError
from msjax.runtime.nodes import AttentionNode, ExpertNode
from msjax.runtime.processes import NodeProcess, NodeProcesses
from msjax.runtime.runner import NodeHealth, RunnerHealth

_LIVE: "weakref.WeakSet[NodeRunner]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for runner in list(_LIVE):
        runner.close()


@dataclasses.dataclass
class _Joining:
    """A lost expert node's new process, starting on the channels of `topology`'s generation."""

    proc: NodeProcess
    topology: p.Topology
    experts: tuple[int, ...]
    started: float


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
        self.lost: set[int] = set()  # expert nodes lost (their processes are gone); they hold no experts
        self.faults = FaultStats()
        self.timeline = None
        self._python = python
        self._step = 0
        self._server = self._runner_endpoints = None
        self._rejoined: list = []  # the runner's control endpoints for nodes that rejoined
        self._joining: dict[int, _Joining] = {}  # lost expert nodes whose new process is starting
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

    @property
    def live_expert_keys(self) -> list[tuple[str, int]]:
        return [k for k in self.expert_keys if k[1] not in self.lost]

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
                                          self._check_waiting, self.startup_timeout_s + self.timeout_s)
        except WorkerError:
            raise
        except Exception as err:
            if any(True for _ in self.processes.dead()):
                self.processes.check("while starting")
            raise WorkerError(f"the deployment did not start: {type(err).__name__}: {err}"
                              + self.processes.logs()) from err
        finally:
            rendezvous.close()

    def _spec(self, role: str, index: int, topology=None, placement=None) -> p.NodeSpec:
        """What node process (role, index) starts with (on `topology`, holding its share of `placement`: by
        default the deployment's); its weights from the checkpoint or a file of them."""
        d = self.deployment
        topology, placement = topology or self.topology, placement or self.placement
        weights = None
        if self.checkpoint is None:
            state = (self.model.attention_state if role == "attention"
                     else self.model.expert_subset(placement[index])[1])
            weights = str(self._write_weights(state, f"{role}{index}-g{topology.generation}-start"))
        return p.NodeSpec(role=role, index=index, model=self.cfg, engine=d.engine, dtype=np.dtype(self.model.dtype).name,
                          kernels=self.model.kernels, tp=d.plan.attention_tp if role == "attention" else d.plan.expert_tp,
                          platform=d.platform, placement=placement, topology=topology,
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
        tokens = max(int(mb.tokens.shape[0]) for node in batches for mb in node)
        if tokens > self.deployment.max_tokens:
            raise ValueError(f"a micro-batch of {tokens} tokens exceeds the deployment's "
                             f"{self.deployment.max_tokens}")
        try:
            if self._joining:
                self._finish_rejoins()
            for _ in range(len(self.expert_keys) + 1):  # every pass that does not return loses a node
                self._recover("before the step")
                done, lost = self._exchange(batches, tokens)
                if not lost:
                    break
                self.faults.rerun_steps += 1
                self._lose(lost, f"during step {self._step}")
            else:
                raise WorkerError("the step could not complete after losing expert nodes")
        except Exception as err:  # noqa: BLE001 - any other failure mid-step leaves the channels out of step
            self._fail(err)
        if self.lost:
            self.faults.degraded_steps += 1
            self.faults.degraded_tokens += sum(len(mb.logit_rows) for node in batches for mb in node)
        return [list(done[a].sampled) if a in done else [] for a in range(len(batches))]

    def _exchange(self, batches, tokens: int) -> tuple[dict, set[int]]:
        """One pass of the step over the live expert nodes -> (each busy attention node's StepDone, the expert
        nodes the attention nodes lost during it: then the sampled tokens are not to be used)."""
        # every packet of the step gets the capacity of its largest (a receive may be larger than what is
        # sent): an expert node's program then depends on which attention nodes send in each round and on
        # that one capacity, not on every combination of the attention nodes' shapes (which a server could
        # neither compile ahead nor avoid meeting one by one)
        cap = tokens * self.cfg.top_k
        rounds = [tuple((a, cap) for a, node in enumerate(batches) if i < len(node))
                  for i in range(max(len(node) for node in batches))]
        self._step += 1
        busy = [a for a, node in enumerate(batches) if node]
        experts, gone = self.live_expert_keys, set()
        for e in experts:
            try:
                self._submit(e, p.ExpertStep(self._step, tuple(rounds)))
            except native.M2NError:  # its control channel is gone with it; the attention nodes notice too
                gone.add(e[1])
        for a in busy:
            self._submit(("attention", a), p.AttentionStep(self._step, tuple(step_inputs.pack(b) for b in batches[a])))
        done = {a: self._reply(("attention", a), p.StepDone) for a in busy}
        lost = {e for d in done.values() for e in d.lost} - self.lost
        for e in experts:
            if e[1] in gone or e[1] in lost:  # `_lose` stops it if it still runs
                continue
            try:
                self._reply(e, p.StepDone)
            except NodeLost:  # it died after its last packet of the step: the step's tokens stand
                gone.add(e[1])
        if gone - lost:
            self._lose(gone - lost, f"after step {self._step}")
        return done, lost

    def _check_waiting(self, node_key, when: str) -> None:
        """While waiting for node `node_key`'s reply: a NodeLost when its process exited, a WorkerError when an
        attention process did (its requests' KV caches went with it)."""
        for proc in self.processes.dead():
            if proc.role == "attention":
                raise WorkerError(proc.exited(when) + self.processes.logs())
            if (proc.role, proc.index) == node_key:
                raise NodeLost(node_key, proc.exited(when))

    def _newly_dead(self) -> list:
        """Node processes that exited and are not yet lost: any attention process, and live expert nodes."""
        return [proc for proc in self.processes.dead() if proc.role == "attention" or proc.index not in self.lost]

    def _recover(self, when: str) -> None:
        """Expert node processes that exited since the last step are lost; an attention process that did ends
        the deployment."""
        dead = self._newly_dead()
        for proc in dead:
            if proc.role == "attention":
                raise WorkerError(proc.exited(when) + self.processes.logs())
        if dead:
            self._lose({proc.index for proc in dead}, when)

    def _lose(self, nodes: set[int], when: str) -> None:
        """Take expert nodes `nodes` out of the deployment: stop what is left of them, re-route their experts to
        live replicas, load those without one onto live nodes, and tell every attention node, before the next
        step. A ConfigError when no expert node is left."""
        for e in sorted(nodes):
            if ("expert", e) in self.local:
                raise WorkerError(f"expert node {e} (in this process) lost its channels {when}")
            proc = self.processes.procs["expert", e]
            if proc.alive():  # it stopped answering but runs: make sure it cannot come back half-way
                proc.proc.kill()
            self.lost.add(e)
            self.faults.faults += 1
            self._mark(f"expert node {e} lost {when} (exit code {proc.proc.poll()})")
        degraded = degrade(self.placement, self.shares, self.lost, self.cfg.num_experts)
        if degraded.loads:
            start = time.monotonic()
            errors = self._place(degraded.loads)
            if errors:
                raise WorkerError("the live expert nodes could not load the lost nodes' experts: "
                                  + "; ".join(f"node {e}: {m}" for e, m in errors.items()))
            self.faults.rebuilds += 1
            self.faults.rebuild_s += time.monotonic() - start
        self._ask(self.attention_keys, p.SetRouting(degraded.placement, degraded.shares), p.Ok)
        rebuilt = rebuilt_experts(self.placement, degraded)
        self.placement, self.shares = degraded.placement, degraded.shares
        self._mark(f"re-routed: experts on nodes {[e for e in range(len(self.placement)) if e not in self.lost]}"
                   + (f", experts {list(rebuilt)} loaded onto nodes {sorted(degraded.loads)}" if rebuilt else ""))
        if self.deployment.plan.restart_lost_experts:
            for e in sorted(nodes):
                self.rejoin(e, wait=False)

    def rejoin(self, node: int, wait: bool = True) -> bool:
        """Start lost expert node `node` again: a new process loads the experts the plan gave it (meanwhile steps
        go on without it); once it has, between steps, every node's packet channels move to the next generation
        (through the rendezvous, so the new process meets them as the first one did) and the node goes back into
        the placement with those experts as extra replicas: from the next step their tokens split between it
        and the nodes that took them over, and a rebalance (`Engine.rebalance`) places for the load from then
        on. `wait`: return once it serves (else at once: `step` finishes the rejoin when the node is ready).
        Returns whether it serves. A ConfigError when the node is not lost; a WorkerError when it cannot start."""
        self._check_open()
        if node not in self.lost:
            raise ConfigError("node", f"expert node {node} is not lost (lost: {sorted(self.lost)})")
        if node not in self._joining:
            generation = max([self.topology.generation, *(j.topology.generation for j in self._joining.values())])
            topology = dataclasses.replace(self.topology, generation=generation + 1)
            experts = self.deployment.plan.expert_placement(self.cfg.num_experts)[node]
            placement = tuple(experts if e == node else held for e, held in enumerate(self.placement))
            proc = NodeProcess(self._spec("expert", node, topology, placement), self._tmp, self._python,
                               generation=topology.generation)
            self._joining[node] = _Joining(proc, topology, experts, time.monotonic())
            self._mark(f"expert node {node} restarting (pid {proc.pid})")
        if wait:
            deadline = time.monotonic() + self.startup_timeout_s
            while not self.rejoin_ready(node):
                if time.monotonic() > deadline:
                    self._fail(WorkerError(f"expert node {node} did not start within {self.startup_timeout_s:.0f} s"))
                time.sleep(0.02)
        return self._finish_rejoins() and node not in self.lost

    @property
    def restarting(self) -> list[int]:
        """Lost expert nodes whose new process is starting (they rejoin at the first step after it is ready)."""
        return sorted(self._joining)

    def rejoin_ready(self, node: int) -> bool:
        """Whether restarting node `node`'s new process has loaded and opened its receivers (a WorkerError if it
        died)."""
        joining = self._joining[node]
        if not joining.proc.alive():
            del self._joining[node]
            raise WorkerError(joining.proc.exited("while starting again") + joining.proc.log_tail())
        run = channel_run(joining.topology)
        return self._server.has(key(run, "dispatch", node), key(run, "control", "expert", node))

    def _finish_rejoins(self) -> bool:
        """Between steps: bring in every restarting node whose process is ready (see `rejoin`). -> any joined."""
        ready = [node for node in list(self._joining) if self.rejoin_ready(node)]
        if not ready:
            return False
        node = ready[0]  # one generation per node: each rewire takes every node's channels once
        joining = self._joining.pop(node)
        try:
            self._rewire(node, joining)
        except Exception as err:  # noqa: BLE001 - half the nodes may be on the new channels: cannot go on
            self._fail(err)
        return True

    def _rewire(self, node: int, joining: "_Joining") -> None:
        from msjax.comm.rendezvous import RendezvousClient
        topology, node_key = joining.topology, ("expert", node)
        rendezvous = RendezvousClient(self._server.address, token=topology.token, timeout_s=self.startup_timeout_s)
        try:
            self.processes.add(joining.proc)

            def alive():  # the new process and every live one
                for proc in self._newly_dead() + ([] if joining.proc.alive() else [joining.proc]):
                    raise WorkerError(proc.exited(f"while expert node {node} rejoined") + self.processes.logs())
            remote = [k for k in self.attention_keys + self.live_expert_keys if k not in self.local]
            for k in remote:  # they open their next-generation receivers at once, then connect
                self.links.submit(k, p.Rewire(topology.generation))
            control = runner_endpoints(topology, rendezvous, [node_key])
            local = {k: packet_endpoints(topology, rendezvous, *k) for k in self.local.nodes}
            for ep in [control, *local.values()]:
                ep.connect(alive)
            for k, ep in local.items():
                self.local.nodes[k].rewire(ep)
            rendezvous.get(key(channel_run(topology), "ready", *node_key), self.startup_timeout_s, alive=alive)
            for k in remote:
                self._reply(k, p.Ok)
        finally:
            rendezvous.close()
        for old in (self.links.senders.get(node_key), self.links.receivers.get(node_key)):
            if old is not None:
                old.close()
        self.links.senders[node_key] = control.senders[f"control/expert/{node}"]
        self.links.receivers[node_key] = control.receivers[f"reply/expert/{node}"]
        self._rejoined.append(control)
        self.topology = topology
        self.lost.discard(node)
        placement = tuple(joining.experts if e == node else held for e, held in enumerate(self.placement))
        shares = None if self.shares is None else tuple(
            (1.0,) * len(joining.experts) if e == node else held for e, held in enumerate(self.shares))
        self._ask(self.attention_keys, p.SetRouting(placement, shares), p.Ok)
        self.placement, self.shares = placement, shares
        self.faults.rejoins += 1
        self._mark(f"expert node {node} rejoined with experts {list(joining.experts)}, "
                   f"{time.monotonic() - joining.started:.1f} s after its restart")

    def _mark(self, text: str) -> None:
        self.faults.event(text)
        if self.timeline is not None:
            self.timeline.mark(text)

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
        check_placement(placement, self.cfg.num_experts, len(self.expert_keys), self.lost)
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
        """Healthy while the runner can step: open, every attention node alive and at least one expert node.
        Degraded while expert nodes are lost (or have exited since the last step, which loses them)."""
        nodes = [NodeHealth(role, index, "local", os.getpid(), not self.closed) for role, index in self.local.nodes]
        nodes += [NodeHealth(proc.role, proc.index, "process", proc.pid, proc.alive()) for proc in self.processes]
        gone = {n.index for n in nodes if n.role == "expert" and not n.alive} | self.lost
        fatal = [f"{n.role} node {n.index}" for n in nodes if not n.alive and n.where == "process"
                 and n.role == "attention"]
        if not self.closed and len(gone) == len(self.expert_keys):
            fatal += [f"every expert node ({', '.join(map(str, sorted(gone)))})"]
        detail = "closed" if self.closed else (f"{', '.join(fatal)} exited" if fatal else "")
        degraded = (f"expert nodes {sorted(gone)} lost: serving on {len(self.expert_keys) - len(gone)} of "
                    f"{len(self.expert_keys)}" if gone and not detail else "")
        return RunnerHealth(not detail, detail, tuple(sorted(nodes, key=lambda n: (n.role, n.index))), degraded,
                            tuple(sorted(gone)))

    def attach_timeline(self, timeline) -> None:
        self.timeline = timeline
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
        what = ("; ".join(proc.exited() for proc in dead)
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
        for joining in self._joining.values():  # restarting, not yet in the deployment
            joining.proc.proc.kill()
            joining.proc.proc.wait()
        self._joining.clear()
        self.processes.stop(timeout_s)
        self.local.close()
        for closable in (self._runner_endpoints, *self._rejoined, self._server):
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

