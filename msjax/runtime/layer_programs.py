"""The ping-pong pipeline (paper §4.1), as the nodes run it: one jitted program per layer, reused for every layer.

An attention node runs a step of m micro-batches as three programs, the middle one once per layer:

    first          embed, then per micro-batch i: attention of layer 0, pack, m2n_send to every expert node
    layer (l)      per micro-batch i: m2n_recv_all of layer l-1's expert outputs, combine, attention of layer l,
                   pack, send
    head           per micro-batch i: receive layer L-1's outputs, combine, LM head, sampling

and an expert node one program per layer: per micro-batch (round) i, receive the packets of every attention node
that sends in that round, run its experts, send each its outputs. Within a program the micro-batches take turns,
so the attention of micro-batch i+1 runs while the experts hold micro-batch i; across programs a node's layers
follow each other on its devices. Every m2n call is chained to the previous one through an int32 token (the only
order XLA keeps between custom calls), across programs too.

Why one program per layer: its weights are that layer's own arrays (`msjax.models.layer_states.split_layers`),
so nothing is sliced out of a stacked array (which XLA copies; on this project's CPU such copies cost more than
the expert matmuls at decode batch sizes), the layer index is a traced argument (one compile for every layer:
compile time does not grow with depth), and the host dispatches L + 2 programs per step (cheap next to a layer).

The same programs run wherever the node is hosted (the runner's process, a node process) and over every native
transport; only the endpoints differ.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from msjax.comm.m2n import Packet, Routing, combine_returned, pack
from msjax.comm.node_calls import NodeM2N
from msjax.comm.wire import pack_rows, row_bytes, unpack_rows
from msjax.runtime import step_inputs
from msjax.runtime.sampler import sample

_ATTENTION_STATIC = ("layouts", "record")


def _named(method, name: str):
    """`method` under `name`: the name of its HLO module ("jit_<name>"), which device timelines match."""
    @functools.wraps(method)
    def program(*args, **kwargs):
        return method(*args, **kwargs)
    program.__name__ = program.__qualname__ = name
    return program


class AttentionPrograms:
    """The three programs of an attention node with graph definition `graphdef` on `mesh` (None: one device),
    sending packets on `tx` (a Sender to every expert node) and receiving outputs on `back` (a Receiver from
    every expert node).

        first(state0, inputs, kv, token, load, routing)                 -> (h, sent, kv, token, load, traffic)
        layer(state_l, layer, h, sent, inputs, kv, token, load, routing) -> (h, sent, kv, token, load, traffic)
        head(state0, layer, h, sent, inputs, token)                      -> (sampled, token)

    inputs[i] = (int32 [...], float32 [2 s_i]) packed by `step_inputs.pack`, with `layouts[i]` its static
    layout; h[i] [t_i, hidden] the residual streams; sent[i] = (orders per expert node, topk weights) of the
    last send; load [num_experts] int32 tokens routed per expert (donated, added to); traffic (with `record`)
    per micro-batch what was routed and sent, for tests; `routing` where every expert lives (`Routing.tables()`:
    arrays, so a re-placement or a lost node changes no program). Every program sends to and receives from all
    the expert nodes: a node out of the deployment gets empty packets, which the tolerant endpoints drop, and
    its outputs read as zeros at once (`AttentionNode` marks it lost)."""

    def __init__(self, cfg, graphdef, tx, back, dtype, mesh=None):
        self.cfg, self.graphdef, self.tx, self.back = cfg, graphdef, tx, back
        self.num_nodes = back.num_senders  # expert nodes
        self.dtype, self.m2n = jnp.dtype(dtype), NodeM2N(mesh)
        donate = ("kv", "load")
        self.first = jax.jit(_named(self._first, "attention_first"), static_argnames=_ATTENTION_STATIC,
                             donate_argnames=donate)
        self.layer = jax.jit(_named(self._layer, "attention_layer"), static_argnames=_ATTENTION_STATIC,
                             donate_argnames=donate)
        self.head = jax.jit(_named(self._head, "attention_head"), static_argnames=("layouts",))

    # -- pieces, traced inside the programs --

    def _send(self, state, layer, i, h, moe, batch, kv, token, load, *, decode, routing, record):
        """Attention of micro-batch i at `layer`, its packets to every expert node (m2n_send, in turn)."""
        attention = nnx.merge(self.graphdef, state)
        h, x, topk_ids, topk_weights, kv = attention(layer, h + moe, batch, kv, decode=decode)
        valid = batch.positions >= 0
        packed = [pack(x, topk_ids, valid, routing, node) for node in range(self.num_nodes)]
        packets, orders = tuple(p for p, _ in packed), tuple(o for _, o in packed)
        num_experts = self.cfg.num_experts
        load = load + jnp.sum((topk_ids[..., None] == jnp.arange(num_experts)) & valid[:, None, None],
                              axis=(0, 1), dtype=jnp.int32)
        for e, p in enumerate(packets):  # each send after the previous m2n call
            token = self.m2n.send(pack_rows(p.rows, p.expert_ids), p.count, self.tx, receiver=e, layer=layer,
                                  micro_batch=i, after=token)
        traffic = dict(topk_ids=topk_ids, valid=valid, orders=orders,
                       counts=tuple(p.count for p in packets)) if record else None
        return h, (orders, topk_weights), kv, token, load, traffic

    def _recv(self, layer, i, sent, token):
        """Layer `layer`'s expert outputs of micro-batch i from every expert node (one m2n_recv_all, taken as
        they come), combined: [t_i, hidden]."""
        orders, weights = sent
        likes = [jax.ShapeDtypeStruct((order.shape[0], self.cfg.hidden_size), self.dtype) for order in orders]
        outs, counts = self.m2n.recv_all(self.back, senders=list(range(len(orders))), likes=likes, layer=layer,
                                         micro_batch=i, after=token)
        return combine_returned(tuple(outs), orders, weights), counts[-1]

    # -- the programs --

    def _first(self, state, inputs, kv, token, load, routing, *, layouts, record):
        xs = [step_inputs.unpack(ints, floats, lay) for (ints, floats), lay in zip(inputs, layouts)]
        embed = nnx.merge(self.graphdef, state).embed_tokens
        h, sent, traffic = [embed(x[0]) for x in xs], [], []  # h[i]: [t_i, hidden]
        for i, (x, lay) in enumerate(zip(xs, layouts)):
            # this attention after the previous micro-batch's send: without the order XLA may run every
            # micro-batch's attention first and hold the sends back, idling the expert nodes
            h[i], token = jax.lax.optimization_barrier((h[i], token))
            h[i], s, kv, token, load, t = self._send(state, 0, i, h[i], jnp.zeros_like(h[i]), x[1], kv, token, load,
                                                     decode=lay[3], routing=routing, record=record)
            # the next micro-batch writes the cache only after this one's attention has read it: without the
            # order XLA may schedule that write first and copy the whole cache to keep this read
            kv, h[i] = jax.lax.optimization_barrier((kv, h[i]))
            sent.append(s)
            traffic.append(t)
        return tuple(h), tuple(sent), kv, token, load, tuple(traffic) if record else ()

    def _layer(self, state, layer, h, sent, inputs, kv, token, load, routing, *, layouts, record):
        xs = [step_inputs.unpack(ints, floats, lay) for (ints, floats), lay in zip(inputs, layouts)]
        h, sent, traffic = list(h), list(sent), []
        for i, (x, lay) in enumerate(zip(xs, layouts)):
            moe, token = self._recv(layer - 1, i, sent[i], token)
            h[i], sent[i], kv, token, load, t = self._send(state, layer, i, h[i], moe, x[1], kv, token, load,
                                                           decode=lay[3], routing=routing, record=record)
            kv, h[i] = jax.lax.optimization_barrier((kv, h[i]))  # as in `_first`
            traffic.append(t)
        return tuple(h), tuple(sent), kv, token, load, tuple(traffic) if record else ()

    def _head(self, state, layer, h, sent, inputs, token, *, layouts):
        """Each micro-batch's LM head and sampling right after its last receive, while the experts finish the
        next micro-batches."""
        model = nnx.merge(self.graphdef, state)
        sampled = []
        for i, ((ints, floats), lay) in enumerate(zip(inputs, layouts)):
            x = step_inputs.unpack(ints, floats, lay)
            moe, token = self._recv(layer, i, sent[i], token)
            logits = model.logits((h[i] + moe)[x[2]])
            out = sample(logits, x[3], x[5], x[4], x[6], x[7], num_logprobs=lay[4])
            out, token = jax.lax.optimization_barrier((out, token))  # before the next receive
            sampled.append(out)
        return tuple(sampled), token


class ExpertPrograms:
    """The layer program of an expert node holding experts `expert_ids` (graph definition `graphdef`, on
    `mesh`), receiving packets on `rx` (a Receiver from every attention node) and sending outputs on `back` (a
    Sender to every attention node): `layer(state_l, layer, token, rounds=...) -> token`, `rounds[i]` the
    (attention node, packet capacity) pairs that send in round (micro-batch) i. One compile per `rounds`."""

    def __init__(self, cfg, graphdef, expert_ids: tuple[int, ...], rx, back, dtype, mesh=None):
        self.cfg, self.graphdef, self.num_local = cfg, graphdef, len(expert_ids)
        self.rx, self.back, self.dtype, self.m2n = rx, back, jnp.dtype(dtype), NodeM2N(mesh)
        self.layer = jax.jit(_named(self._layer, "expert_layer"), static_argnames=("rounds",))

    def _layer(self, state, layer, token, *, rounds):
        hidden = self.cfg.hidden_size
        for i, caps in enumerate(rounds):
            likes = [jax.ShapeDtypeStruct((cap, row_bytes(hidden, self.dtype)), jnp.uint8) for _, cap in caps]
            bufs, counts = self.m2n.recv_all(self.rx, senders=[a for a, _ in caps], likes=likes, layer=layer,
                                             micro_batch=i, after=token)
            token = counts[-1]
            packets = []
            for j, ((_, cap), buf) in enumerate(zip(caps, bufs)):
                rows, ids = unpack_rows(buf, hidden, self.dtype)
                ids = jnp.where(jnp.arange(cap) < counts[j], ids, self.num_local)  # padding rows: no expert
                packets.append(Packet(rows=rows, expert_ids=ids, count=counts[j]))
            outs = run_experts(self.graphdef, state, layer, tuple(packets))
            for (a, _), out, p in zip(caps, outs, packets):
                token = self.m2n.send(out, p.count, self.back, receiver=a, layer=layer, micro_batch=i, after=token)
        return token


def run_experts(graphdef, state, layer, packets: tuple[Packet, ...]) -> tuple[jax.Array, ...]:
    """A node's experts over the packets of every attention node of a round -> one output buffer per packet
    [capacity_j, hidden], row for row."""
    experts = nnx.merge(graphdef, state)
    num_local = len(experts.expert_ids)
    rows = jnp.concatenate([p.rows for p in packets])
    ids = jnp.concatenate([p.expert_ids for p in packets])
    order = jnp.argsort(ids, stable=True)
    group_sizes = jnp.sum(ids[:, None] == jnp.arange(num_local)[None, :], axis=0, dtype=jnp.int32)
    out_sorted = experts(layer, rows[order], group_sizes)
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
    cuts = [sum(p.rows.shape[0] for p in packets[:j + 1]) for j in range(len(packets) - 1)]
    return tuple(jnp.split(out, cuts))


__all__ = ["AttentionPrograms", "ExpertPrograms", "Routing", "run_experts"]
