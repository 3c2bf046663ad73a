"""Compile every step shape before serving: the shapes the engine pads its steps to are a finite set
(`msjax.engine.batch`), so a server can run each one once, on padding, before it reports ready, and no request
ever waits for a compile.

What compiles per shape:
- an attention node's programs, per (decode or prefill, sequences, tokens, micro-batches) of its own step, and
  its head per whether the step computes logprobs;
- an expert node's layer program, per the rounds it receives: which attention nodes send in each round
  (micro-batch) and the packet capacity, which the runner pads to the step's largest (`NodeRunner.step`), so
  the attention nodes' shapes meet the expert nodes' programs only through that one capacity.

The steps run through the Runner on padding-only micro-batches (every position -1: nothing is written to the KV
cache, nothing is sampled that anyone reads), so the same warm-up serves a colocated engine, in-process nodes and
node processes.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import numpy as np

from msjax.config import MAX_LOGPROBS
from msjax.engine.batch import bucket, decode_bucket
from msjax.runtime.step_inputs import StepBatch

# enumerate the mixes of busy and idle attention nodes only up to this many (2 nodes at m = 2: 8); beyond it,
# steps where every attention node runs the same number of micro-batches are compiled and other mixes compile
# when first seen
MAX_MIXES = 64


@dataclasses.dataclass(frozen=True, order=True)
class ReplicaShape:
    """The padded shape of one attention node's step: `micro_batches` micro-batches of `seqs` sequences and
    `tokens` tokens each."""

    decode: bool
    seqs: int
    tokens: int
    micro_batches: int


def replica_shapes(max_num_seqs: int, max_num_batched_tokens: int, m: int) -> list[ReplicaShape]:
    """Every shape `Engine.step` can give one attention node (see `split_micro_batches`, `build_micro_batches`):
    decode steps of n = 1..max_num_seqs sequences in min(m, n) micro-batches of at most ceil(n / c) each; prefill
    steps in c = 1..m micro-batches of max_num_seqs rows, each padded to the token bucket of its largest
    micro-batch (at most max_num_batched_tokens - (c - 1): the others hold a token each)."""
    shapes = set()
    for n in range(1, max_num_seqs + 1):
        c = min(m, n)
        per = decode_bucket(-(-n // c), max_num_seqs)
        shapes.add(ReplicaShape(True, per, per, c))
    for c in range(1, min(m, max_num_seqs) + 1):
        for tokens in range(1, max_num_batched_tokens - (c - 1) + 1):
            shapes.add(ReplicaShape(False, max_num_seqs, bucket(tokens, max_num_batched_tokens, smallest=16), c))
    return sorted(shapes)


def padding_batch(shape: ReplicaShape, num_logprobs: int, max_pages_per_seq: int) -> StepBatch:
    """One micro-batch of `shape` with every row padding."""
    t, s = shape.tokens, shape.seqs
    return StepBatch(shape.decode, num_logprobs, np.zeros(t, np.int32), np.full(t, -1, np.int32),
                     np.zeros(t, np.int32), np.zeros((s, max_pages_per_seq), np.int32), np.zeros(s, np.int32),
                     np.zeros(s, np.float32), np.ones(s, np.float32), np.zeros(s, np.int32),
                     np.zeros(s, np.uint32), np.zeros(s, np.int32))


def warmup_steps(num_replicas: int, shapes: list[ReplicaShape], m: int) -> list[tuple[ReplicaShape | None, ...]]:
    """The steps to run, each a shape (or None: idle) per attention node:
    1. every shape on every node at once, without and with logprobs (the caller runs each of these twice):
       each node's programs, and the expert programs for all nodes sending alike;
    2. for several nodes, each mix of micro-batch counts (idle included) that step 1 does not cover, at each
       packet capacity: the expert programs for the rounds such a step makes."""
    steps = [tuple([shape] * num_replicas) for shape in shapes]
    if num_replicas == 1:
        return steps
    mixes = [c for c in itertools.product(range(m + 1), repeat=num_replicas) if any(c) and len(set(c)) > 1]
    if len(mixes) > MAX_MIXES:
        return steps
    by_count = {c: [s for s in shapes if s.micro_batches == c] for c in range(1, m + 1)}
    capacities = sorted({s.tokens for s in shapes})
    for mix, cap in itertools.product(mixes, capacities):
        # each busy node: its largest shape with that many micro-batches within `cap`; the step's capacity (the
        # largest of them) must be `cap` itself, else this step is another (or none the engine makes)
        chosen = [max((s for s in by_count[c] if s.tokens <= cap), key=lambda s: s.tokens, default=None) if c
                  else None for c in mix]
        if any(ch is None for ch, c in zip(chosen, mix) if c):
            continue
        if max(ch.tokens for ch in chosen if ch is not None) == cap:
            steps.append(tuple(chosen))
    return steps


def warm_up(engine, progress: Callable[[int, int], None] | None = None) -> int:
    """Run every warm-up step through `engine.runner` (before serving: no request may be in the engine);
    `progress(done, total)` after each. Returns the number of steps run."""
    if engine.has_unfinished():
        raise RuntimeError("warm up an idle engine: requests are in flight")
    cfg = engine.config
    shapes = replica_shapes(cfg.max_num_seqs, cfg.max_num_batched_tokens, engine.micro_batches)
    steps = warmup_steps(len(engine.replicas), shapes, engine.micro_batches)
    runs = [(step, 0) for step in steps] + [(step, MAX_LOGPROBS) for step in steps[:len(shapes)]]
    for done, (step, num_logprobs) in enumerate(runs, 1):
        batches = [[padding_batch(s, num_logprobs, engine.max_pages_per_seq)] * s.micro_batches if s else []
                   for s in step]
        engine.runner.step(batches)
        if progress is not None:
            progress(done, len(runs))
    engine.discard_expert_load()  # padding routed nowhere the balancer should see
    return len(runs)


__all__ = ["MAX_MIXES", "ReplicaShape", "padding_batch", "replica_shapes", "warm_up", "warmup_steps"]
