"""One expert node as its own process (`python -m msjax.runtime.expert_worker --spec FILE`), started by
`msjax.runtime.multiprocess.MultiProcessRunner`.

It loads only its experts, meets the engine through JAX's distributed key-value store (addresses of the M2N
endpoints), then loops: a small control message from attention node 0 says what the next step holds (per round:
which attention nodes send and their packet capacities); one jitted program per step then, for every (layer,
micro-batch), receives the packets of every active attention node (`m2n_recv_all`: one call, the packets taken
as they come), runs the node's experts and sends each attention node its outputs (`m2n_send`) — no Python on the
data path. A control message {"stop": true} ends it.
"""

from __future__ import annotations

import json
import os
import pickle
import sys

from msjax.runtime import worker_process


def _log(msg: str) -> None:
    worker_process.log("expert", msg)


def main(argv=None) -> int:
    return worker_process.main(argv, serve)


def serve(spec: dict, parent: int) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from msjax.comm import native
    from jax.sharding import Mesh

    from msjax.models import sharding
    from msjax.models.layer_states import split_layers
    from msjax.models.modules import ExpertRole

    node, n_a, transport = spec["node"], spec["attention_nodes"], spec["transport"]
    cfg, expert_ids = spec["config"], tuple(spec["expert_ids"])
    dtype = jnp.dtype(spec["dtype"])
    # the node's devices: tensor-parallel over them when several (expert FFN sharded, EXPERT_TP_RULES)
    mesh = Mesh(np.array(jax.devices()[:spec.get("tp", 1)]), ("tp",))

    # -- weights: only this node's experts --
    def load_experts(ids: tuple[int, ...], leaves=None):
        """(graphdef, per-layer states) of experts `ids`: from the checkpoint, else from `leaves` (arrays in tree
        order)."""
        if spec.get("checkpoint"):
            from msjax.checkpoint import load_expert_role
            module = load_expert_role(spec["checkpoint"], cfg, expert_ids=ids, dtype=dtype)
        else:
            module = worker_process.module_from_leaves(
                lambda: ExpertRole(cfg, expert_ids=ids, dtype=dtype, rngs=nnx.Rngs(0)), leaves)
        if spec.get("kernels"):
            module.kernels = spec["kernels"]
        graphdef, state = nnx.split(module)
        state = sharding.shard_state(state, sharding.EXPERT_TP_RULES, mesh)
        return graphdef, split_layers(state, cfg.num_layers)  # each layer's weights its own arrays

    graphdef, layers = load_experts(expert_ids, spec.get("leaves"))

    # -- rendezvous through JAX's coordination service (key-value store) --
    client = worker_process.rendezvous_client(spec)
    prefix = spec["prefix"]
    timeout_s = spec["timeout_s"]
    rx = native.Receiver(transport, spec["dispatch_address"], node, n_a, spec["dispatch_bytes"],
                         timeout_s=timeout_s)
    client.key_value_set(f"{prefix}/dispatch/{node}", rx.address)  # shm: the channel; tcp: host:port as bound
    ms = int(spec["startup_timeout_s"] * 1000)
    back_addresses = [client.blocking_key_value_get(f"{prefix}/back/{a}", ms) for a in range(n_a)]
    back = native.Sender(transport, back_addresses, node, spec["back_bytes"], timeout_s=timeout_s)
    client.key_value_set(f"{prefix}/ready/{node}", "1")
    worker_process.end_rendezvous(client)

    programs = StepPrograms(cfg, graphdef, expert_ids, rx, back, dtype, mesh)

    token = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
    _log(f"node {node} ready with experts {list(expert_ids)} over {transport}")
    while True:
        raw = worker_process.next_message(rx, parent, "expert", layer=cfg.num_layers, micro_batch=0)
        if raw is None:
            return 3
        msg = json.loads(raw.decode())
        if msg.get("stop"):
            break
        if "place" in msg:  # re-placement between steps: load the new experts, answer attention node 0
            reply = {"ok": True}
            try:
                ids = tuple(int(x) for x in msg["place"])
                leaves = None
                if msg.get("leaves"):
                    with open(msg["leaves"], "rb") as f:
                        leaves = pickle.load(f)
                    os.unlink(msg["leaves"])
                graphdef, layers = load_experts(ids, leaves)
                expert_ids = ids
                programs = StepPrograms(cfg, graphdef, expert_ids, rx, back, dtype, mesh)
                _log(f"node {node} now holds experts {list(expert_ids)}")
            except Exception as err:  # noqa: BLE001 - reported to the engine; this node keeps its experts
                reply = {"error": f"{type(err).__name__}: {err}"}
                _log(f"re-placement to {msg['place']} failed: {reply['error']}")
            back.send(0, json.dumps(reply).encode(), layer=cfg.num_layers, micro_batch=0)
            continue
        rounds = tuple(tuple((int(a), int(c)) for a, c in r) for r in msg["rounds"])
        token = programs(rounds)(layers, token)
        token.block_until_ready()  # the next control message must not overtake this step's receives
    rx.close()
    back.close()
    _log("stopped")
    return 0


class StepPrograms:
    """The expert node's jitted step programs, one per step shape: `programs(rounds)(layers, token) -> token`,
    `layers` the node's weights one state per layer (`msjax.models.layer_states.split_layers`).
    `rounds[i]` lists the (attention node, packet capacity) pairs that send in round (micro-batch) i. A program
    runs a whole step: for every layer and round, receive from each of the round's attention nodes
    (`m2n_recv_all` on `rx`), run the experts, send each attention node its outputs (`m2n_send` on `back`). One
    host call per step (as on the attention side); every m2n call is chained to the previous one through the
    token, so XLA keeps the channels' order. With a `mesh` of several devices (tensor parallelism inside the
    node) each m2n call is issued by its first device only (`NodeM2N`). The profiler times these same programs
    over a loopback (`msjax.planner.profiler.measure_expert_program`)."""

    def __init__(self, cfg, graphdef, expert_ids: tuple[int, ...], rx, back, dtype, mesh=None):
        from msjax.comm.node_calls import NodeM2N
        self.cfg, self.graphdef, self.expert_ids = cfg, graphdef, tuple(expert_ids)
        self.rx, self.back, self.dtype, self.m2n = rx, back, dtype, NodeM2N(mesh)
        self._programs: dict = {}

    def __call__(self, rounds: tuple[tuple[tuple[int, int], ...], ...]):
        if rounds not in self._programs:
            self._programs[rounds] = self._build(rounds)
        return self._programs[rounds]

    def _build(self, rounds):
        import jax
        import jax.numpy as jnp

        from msjax.comm.m2n import Packet
        from msjax.runtime import multiprocess as mp
        from msjax.runtime.disaggregated import expert_step
        cfg, graphdef, rx, back, dtype, m2n = self.cfg, self.graphdef, self.rx, self.back, self.dtype, self.m2n
        hidden, num_local = cfg.hidden_size, len(self.expert_ids)

        def step(layers, token):
            for layer in range(cfg.num_layers):
                for i, caps in enumerate(rounds):
                    packets = []
                    likes = [jax.ShapeDtypeStruct((cap, mp.row_bytes(hidden, dtype)), jnp.uint8) for _, cap in caps]
                    bufs, counts = m2n.recv_all(rx, senders=[a for a, _ in caps], likes=likes, layer=layer,
                                                micro_batch=i, after=token)
                    token = counts[-1]
                    for j, ((_, cap), buf) in enumerate(zip(caps, bufs)):
                        rows, ids = mp.unpack_rows(buf, hidden, dtype)
                        ids = jnp.where(jnp.arange(cap) < counts[j], ids, num_local)  # padding: no expert
                        packets.append(Packet(rows=rows, expert_ids=ids, count=counts[j]))
                    outs = expert_step(graphdef, layers[layer], layer, tuple(packets))
                    for (a, _), out, p in zip(caps, outs, packets):
                        token = m2n.send(out, p.count, back, receiver=a, layer=layer, micro_batch=i, after=token)
            return token
        return jax.jit(step)


if __name__ == "__main__":
    sys.exit(main())
