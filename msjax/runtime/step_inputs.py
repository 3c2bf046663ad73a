"""A micro-batch's step inputs as two packed arrays, and back inside the node's programs.

The scheduler's `StepBatch` has ten arrays; an attention node takes them as one int32 and one float32 array
(`MicroBatch`): two host-to-device transfers per micro-batch instead of ten, each with a fixed host cost
(~0.1 ms on this project's CPU machine) on the step's critical path, and one small control message to a node
process.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from msjax.runtime.protocol import MicroBatch


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """One micro-batch of a step as fixed-shape host arrays: what the engine hands the runner."""

    decode: bool
    num_logprobs: int  # 0 or MAX_LOGPROBS: whether the step computes top logprobs at all
    tokens: np.ndarray  # [tokens] int32
    positions: np.ndarray  # [tokens] int32, -1 for padding
    seq_ids: np.ndarray  # [tokens] int32: row of page_table and of the per-sequence arrays below
    page_table: np.ndarray  # [seqs, max_pages_per_seq] int32
    logit_rows: np.ndarray  # [seqs] int32: token row whose logits sample each sequence
    temperature: np.ndarray  # [seqs] float32
    top_p: np.ndarray  # [seqs] float32
    top_k: np.ndarray  # [seqs] int32
    seeds: np.ndarray  # [seqs] uint32
    steps: np.ndarray  # [seqs] int32: index of the token being sampled in the sequence's output


def pack(b: StepBatch) -> MicroBatch:
    ints = np.concatenate([b.tokens, b.positions, b.seq_ids, b.page_table.ravel(), b.logit_rows, b.top_k, b.steps,
                           b.seeds.view(np.int32)]).astype(np.int32, copy=False)
    floats = np.concatenate([b.temperature, b.top_p]).astype(np.float32, copy=False)
    return MicroBatch(ints, floats, len(b.tokens), len(b.logit_rows), b.page_table.shape[1], bool(b.decode),
                      int(b.num_logprobs))


def layout(mb: MicroBatch) -> tuple[int, int, int, bool, int]:
    """What a program compiles for: (tokens, sequences, pages per sequence, decode, num_logprobs)."""
    return mb.tokens, mb.seqs, mb.pages, mb.decode, mb.num_logprobs


def unpack(ints, floats, layout: tuple):
    """Inside a program: (tokens [t], AttentionBatch, logit_rows [s], temperature [s], top_p [s], top_k [s],
    seeds [s] uint32, steps [s])."""
    import jax
    import jax.numpy as jnp

    from msjax.kv_cache import AttentionBatch
    t, s, p = layout[:3]
    cuts = np.cumsum([t, t, t, s * p, s, s, s])
    tokens, positions, seq_ids, table, logit_rows, top_k, steps, seeds = jnp.split(ints, cuts)
    return (tokens, AttentionBatch(positions, seq_ids, table.reshape(s, p)), logit_rows, floats[:s], floats[s:],
            top_k, jax.lax.bitcast_convert_type(seeds, jnp.uint32), steps)
