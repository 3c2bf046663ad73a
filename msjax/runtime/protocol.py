"""The control protocol between a runner and its nodes: every message a node understands or answers with.

One request, one reply, in order, on a node's control channel (in a node process: an M2N receiver of its own,
separate from the packet channels, so a control message never shares sequence numbers or tags with packets; in
the runner's process: a direct call with the same messages). Encoded by `msjax.comm.wire` (msgpack, versioned,
checked against these annotations on decode).

    runner -> attention node   AttentionStep | SetRouting | ReadLoad | Rewire | Ping | Stop
    runner -> expert node      ExpertStep | Place | Rewire | Ping | Stop
    node -> runner             StepDone | Load | Pong | Ok | Failed

A request a node cannot decode, or one for another role, gets `Failed` and the node serves on.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from msjax.comm.wire import message, register
from msjax.config import EngineConfig, ModelConfig, RopeConfig

register(RopeConfig, ModelConfig, EngineConfig)  # what a node spec carries


# -- steps --------------------------------------------------------------------------------------------------

@message
@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of a step as two packed arrays (`msjax.runtime.step_inputs.pack`): two transfers to the
    device instead of ten, each with a fixed host cost on the step's critical path."""

    ints: np.ndarray  # [3 tokens + seqs (pages + 4)] int32
    floats: np.ndarray  # [2 seqs] float32
    tokens: int
    seqs: int
    pages: int  # page-table width
    decode: bool
    num_logprobs: int


@message
@dataclasses.dataclass(frozen=True)
class AttentionStep:
    step: int
    micro_batches: tuple[MicroBatch, ...]


@message
@dataclasses.dataclass(frozen=True)
class ExpertStep:
    """What the expert node receives this step: per round (micro-batch i), the attention nodes that send and
    their packet capacities in rows. The node compiles one program per distinct `rounds`."""

    step: int
    rounds: tuple[tuple[tuple[int, int], ...], ...]


@message
@dataclasses.dataclass(frozen=True)
class SampledTokens:
    tokens: np.ndarray  # [seqs] int32
    logprobs: np.ndarray  # [seqs] float32
    top_ids: np.ndarray  # [seqs, n] int32
    top_logprobs: np.ndarray  # [seqs, n] float32


@message
@dataclasses.dataclass(frozen=True)
class StepDone:
    """A node finished step `step`: an attention node's sampled tokens per micro-batch; an expert node's none."""

    step: int
    sampled: tuple[SampledTokens, ...] = ()
    # an attention node's expert nodes lost so far (gone mid-exchange: their outputs read as zeros, so this
    # step's tokens must not be used; the runner re-routes and runs the step again)
    lost: tuple[int, ...] = ()


# -- placement and load --------------------------------------------------------------------------------------

@message
@dataclasses.dataclass(frozen=True)
class SetRouting:
    """Where every expert lives from the next step on: each expert node's experts (replicas allowed) and the share
    of each one's tokens it serves (None: equal)."""

    placement: tuple[tuple[int, ...], ...]
    shares: tuple[tuple[float, ...], ...] | None = None


@message
@dataclasses.dataclass(frozen=True)
class Place:
    """Hold experts `experts` from now on: from the checkpoint, or from `weights` (a `Weights` file the runner
    wrote, deleted once read)."""

    experts: tuple[int, ...]
    weights: str | None = None


@message
@dataclasses.dataclass(frozen=True)
class ReadLoad:
    """Tokens routed per expert since the last read (the counter resets)."""


@message
@dataclasses.dataclass(frozen=True)
class Load:
    tokens: np.ndarray  # [num_experts] int32


# -- life ----------------------------------------------------------------------------------------------------

@message
@dataclasses.dataclass(frozen=True)
class Ping:
    pass


@message
@dataclasses.dataclass(frozen=True)
class Pong:
    role: str
    index: int
    steps: int  # steps run so far
    experts: tuple[int, ...] = ()  # an expert node's experts


@message
@dataclasses.dataclass(frozen=True)
class Stop:
    pass


@message
@dataclasses.dataclass(frozen=True)
class Rewire:
    """Move the node's packet channels (dispatch, back) to `generation`, through the deployment's rendezvous:
    open its receivers there, connect its senders, close the old ones (between steps; an expert node rejoins)."""

    generation: int


@message
@dataclasses.dataclass(frozen=True)
class Ok:
    """The request (SetRouting, Place, Stop) took effect."""


@message
@dataclasses.dataclass(frozen=True)
class Failed:
    """The request failed (or could not be decoded); the node still serves. `error`: what went wrong."""

    error: str


STEP_REQUESTS = (AttentionStep, ExpertStep)


# -- what a node process is started with ---------------------------------------------------------------------

@message
@dataclasses.dataclass(frozen=True)
class Weights:
    """A role's weights as arrays in the tree order of its `nnx.State`: how a node gets weights from the runner
    when there is no checkpoint to read."""

    arrays: tuple[np.ndarray, ...]


@message
@dataclasses.dataclass(frozen=True)
class Topology:
    """How the nodes of one deployment reach each other: the transport, the rendezvous, the run's name (channel
    and key prefix), node counts, and every channel's capacity (the engine's limits decide them:
    `msjax.runtime.plan.channel_sizes`)."""

    run: str
    transport: str  # a native M2N transport: loopback, shm, tcp, verbs
    rendezvous: str  # "host:port" of the rendezvous server ("" when every node is in one process)
    token: str  # shared secret of the rendezvous
    attention_nodes: int
    expert_nodes: int
    depth: int  # ring slots per sender on the packet channels: every micro-batch of a layer in flight
    dispatch_bytes: int  # one packet to an expert node
    back_bytes: int  # one expert node's outputs for one packet
    control_bytes: int  # the largest request to a node
    reply_bytes: int  # the largest reply of a node
    timeout_s: float  # how long a packet or reply may take
    startup_timeout_s: float
    generation: int = 0  # of the channels: each rejoin of an expert node rewires every node onto the next one


@message
@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """Everything a node needs to start: which node it is, the model, its devices' platform and count, where its
    weights come from, and the deployment's topology."""

    role: str  # "attention" | "expert"
    index: int
    model: ModelConfig
    engine: EngineConfig
    dtype: str
    kernels: str
    tp: int
    platform: str  # the JAX platform its devices are on ("cpu", "gpu")
    placement: tuple[tuple[int, ...], ...]  # the deployment's expert placement at start
    topology: Topology
    checkpoint: str | None = None  # an HF checkpoint directory to read its weights from
    weights: str | None = None  # else a `Weights` file
    device_ids: tuple[int, ...] = ()  # GPU ordinals on its host (empty: the platform's first tp devices)
