"""The M2N endpoints of a deployment's parties, opened in two phases around a rendezvous.

Channels (each one M2N channel; the receiving side owns the receiver):

    dispatch   attention a -> expert e   packets   receiver: expert e, one sender per attention node
    back       expert e -> attention a   outputs   receiver: attention a, one sender per expert node
    control    runner -> node            requests  receiver: the node (node processes only), one sender
    reply      node -> runner            replies   receiver: the runner, one per node process, one sender

Phase 1 (`Endpoints.receive`): each receiver is opened and its address published under its key
("<run>/<channel>/<index>"). Phase 2 (`Endpoints.connect`): the peers' addresses are read and the senders
opened, which waits for the receivers to exist. A party's phase 2 waits only for other parties' phase 1, so the
parties may start in any order, in any process, on any host the rendezvous reaches.

RDMA verbs has no addresses: both ends of a queue pair publish their connection info for the other and connect
in phase 2 (UNVERIFIED ON HARDWARE, as the verbs transport itself).
"""

from __future__ import annotations

import os
from typing import Callable

from msjax.comm import native

# where tcp receivers bind: loopback unless the host must be reachable from others (several hosts)
BIND_HOST = os.environ.get("MSJAX_M2N_HOST", "127.0.0.1")


def key(run: str, channel: str, *parts) -> str:
    return "/".join([run, channel, *map(str, parts)])


class Endpoints:
    """One party's receivers and senders, by name. `receive` opens a receiver and publishes it at once;
    `send` records a sender that `connect` opens once its receivers are published."""

    def __init__(self, transport: str, run: str, rendezvous, *, depth: int, timeout_s: float,
                 startup_timeout_s: float):
        self.transport, self.run, self.rendezvous = transport, run, rendezvous
        self.depth, self.timeout_s, self.startup_timeout_s = depth, timeout_s, startup_timeout_s
        self.receivers: dict[str, native.Receiver] = {}
        self.senders: dict[str, native.Sender] = {}
        self._planned: list[tuple[str, list[str], int, int]] = []  # (name, receiver keys, index, capacity)
        self._verbs_receivers: list[tuple[native.Receiver, str, int]] = []  # (receiver, its key, senders)

    def receive(self, name: str, at: str, index: int, num_senders: int, capacity: int) -> native.Receiver:
        """Open receiver `index` (of its channel) with a slot ring per sender, published under key `at`."""
        if self.transport == "verbs":
            rx = native.VerbsReceiver(num_senders, index, capacity, depth=self.depth, timeout_s=self.timeout_s)
            for s in range(num_senders):  # its queue pair for sender s, which connects to it in phase 2
                self.rendezvous.set(f"{at}/qp/{s}", rx.local_info(s).hex())
            self._verbs_receivers.append((rx, at, num_senders))
        else:
            channel = at.replace("/", "-")  # loopback / shm: one name per channel; tcp binds a port
            address = channel if self.transport in ("loopback", "shm") else f"{BIND_HOST}:0"
            rx = native.Receiver(self.transport, address, index, num_senders, capacity, depth=self.depth,
                                 timeout_s=self.timeout_s)
            self.rendezvous.set(at, rx.address)
        self.receivers[name] = rx
        return rx

    def send(self, name: str, to: list[str], index: int, capacity: int) -> None:
        """A sender, sender `index` of every receiver published under the keys `to` (in receiver order)."""
        if self.transport == "verbs":  # created now so its connection info is published before anyone waits
            tx = native.VerbsSender(len(to), index, capacity, depth=self.depth, timeout_s=self.timeout_s)
            for r, at in enumerate(to):
                self.rendezvous.set(f"{at}/qp-sender/{index}", tx.local_info(r).hex())
            self.senders[name] = tx
        self._planned.append((name, list(to), index, capacity))

    def connect(self, alive: Callable[[], None] | None = None) -> None:
        """Phase 2: open (or, for verbs, connect) every planned sender; `alive` is checked while waiting for the
        peers' keys (it raises when a peer process is gone)."""
        wait = self.startup_timeout_s
        for name, to, index, capacity in self._planned:
            if self.transport == "verbs":
                tx = self.senders[name]
                for r, at in enumerate(to):
                    tx.connect(r, bytes.fromhex(self.rendezvous.get(f"{at}/qp/{index}", wait, alive=alive)))
            else:
                addresses = self.rendezvous.get_many(to, wait, alive=alive)
                # the receivers exist once published, so opening waits only for a connection (tcp)
                self.senders[name] = native.Sender(self.transport, addresses, index, capacity,
                                                   timeout_s=self.timeout_s)
        for rx, at, num_senders in self._verbs_receivers:
            for s in range(num_senders):
                rx.connect(s, bytes.fromhex(self.rendezvous.get(f"{at}/qp-sender/{s}", wait, alive=alive)))
        self._planned.clear()
        self._verbs_receivers.clear()

    def close(self) -> None:
        for endpoint in (*self.senders.values(), *self.receivers.values()):
            try:
                endpoint.close()
            except Exception:  # noqa: BLE001 - closing on the way out: the others must still close
                pass
        self.senders.clear()
        self.receivers.clear()


def channel_run(topology) -> str:
    """The key prefix of `topology`'s channels: the run's name, and from its first rewire on (an expert node that
    rejoined) the generation too, so a generation's channels (and shm segments) never meet an older one's."""
    return topology.run if not topology.generation else f"{topology.run}-g{topology.generation}"


def packet_endpoints(topology, rendezvous, role: str, index: int) -> Endpoints:
    """Phase 1 of node (role, index)'s packet channels (dispatch, back) at `topology`'s generation."""
    t, run = topology, channel_run(topology)
    ep = Endpoints(t.transport, run, rendezvous, depth=t.depth, timeout_s=t.timeout_s,
                   startup_timeout_s=t.startup_timeout_s)
    if role == "attention":
        ep.receive("back", key(run, "back", index), index, t.expert_nodes, t.back_bytes)
        ep.send("dispatch", [key(run, "dispatch", e) for e in range(t.expert_nodes)], index, t.dispatch_bytes)
    elif role == "expert":
        ep.receive("dispatch", key(run, "dispatch", index), index, t.attention_nodes, t.dispatch_bytes)
        ep.send("back", [key(run, "back", a) for a in range(t.attention_nodes)], index, t.back_bytes)
    else:
        raise ValueError(f"no node role {role!r} (attention, expert)")
    return ep


def node_endpoints(topology, rendezvous, role: str, index: int, *, remote: bool) -> Endpoints:
    """Phase 1 for node (role, index) of `topology` (a `msjax.runtime.protocol.Topology`): its packet receiver
    and, in a node process (`remote`), its control receiver; its senders recorded for `connect`."""
    t, run = topology, channel_run(topology)
    ep = packet_endpoints(topology, rendezvous, role, index)
    if remote:
        ep.receive("control", key(run, "control", role, index), 0, 1, t.control_bytes)
        ep.send("reply", [key(run, "reply", role, index)], 0, t.reply_bytes)
    return ep


def runner_endpoints(topology, rendezvous, remote_nodes: list[tuple[str, int]]) -> Endpoints:
    """Phase 1 for the runner: a reply receiver per node process, control senders recorded for `connect`."""
    t, run = topology, channel_run(topology)
    ep = Endpoints(t.transport, run, rendezvous, depth=t.depth, timeout_s=t.timeout_s,
                   startup_timeout_s=t.startup_timeout_s)
    for role, index in remote_nodes:
        ep.receive(f"reply/{role}/{index}", key(run, "reply", role, index), 0, 1, t.reply_bytes)
        ep.send(f"control/{role}/{index}", [key(run, "control", role, index)], 0, t.control_bytes)
    return ep
