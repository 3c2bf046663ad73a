"""A scheduled step as fixed-shape host arrays: padding to a few bucket sizes keeps the number of compiled
programs small while the batch composition changes every step."""

from __future__ import annotations

import numpy as np

from msjax.config import MAX_LOGPROBS
from msjax.engine.scheduler import StepPlan
from msjax.runtime.step_inputs import StepBatch

__all__ = ["StepBatch", "batch_shape", "bucket", "build_batch", "build_micro_batches", "decode_bucket",
           "decode_buckets"]


def bucket(n: int, cap: int, smallest: int = 1) -> int:
    """The smallest power of two >= n (at least `smallest`), capped at `cap`."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, cap)


MIN_DECODE_ROWS = 2


def decode_bucket(n: int, cap: int) -> int:
    """Sequences of a decode step, padded: powers of two from 2 up to 8, then half-steps too (12, 16, 24, 32,
    48, ...), capped at `cap` (but never under MIN_DECODE_ROWS). With the half-steps under a third of the rows are
    padding, not up to half: 3 micro-batches of 64 sequences run 3 x 24 rows, not 3 x 32, and 40 running
    sequences 48, not 64. One sequence runs as two rows, the second padding: XLA:CPU compiles the one-row
    program's matmuls into much slower code (measured on tiny-moe, 2026-12-07: a one-row decode step 3.3 ms,
    the same step padded to two rows 0.66 ms, same tokens), and on a GPU a row more costs nothing."""
    size = bucket(n, max(cap, MIN_DECODE_ROWS), smallest=MIN_DECODE_ROWS)
    return size * 3 // 4 if size > 8 and size * 3 // 4 >= n else size


def decode_buckets(cap: int) -> list[int]:
    """Every size `decode_bucket` pads to, ascending (what a server compiles before serving)."""
    return sorted({decode_bucket(n, cap) for n in range(1, cap + 1)})


def batch_shape(plan: StepPlan, *, max_num_seqs: int, max_num_batched_tokens: int) -> tuple[int, int, int]:
    """(sequences, tokens, num_logprobs) the arrays of `plan` are padded to."""
    chunks = plan.chunks
    seqs = decode_bucket(len(chunks), max_num_seqs) if plan.decode else max_num_seqs
    total = sum(c.num_tokens for c in chunks)
    num_tokens = seqs if plan.decode else bucket(total, max_num_batched_tokens, smallest=16)
    wants_logprobs = any(c.seq.sampling.logprobs is not None for c in chunks)
    return seqs, num_tokens, MAX_LOGPROBS if wants_logprobs else 0


def build_micro_batches(decode: bool, parts: list[list], *, max_num_seqs: int, max_num_batched_tokens: int,
                        max_pages_per_seq: int) -> list[StepBatch]:
    """The micro-batches of one step (`parts`: each its chunks), all padded to the largest shape among them.
    An attention node runs every micro-batch of a step in one program per layer, compiled per combination of
    their shapes: with one shared shape the combinations are the single buckets, not their m-fold products
    (which a server would meet, and compile, one after another while serving)."""
    plans = [StepPlan(decode, part) for part in parts]
    shapes = [batch_shape(p, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
              for p in plans]
    shape = tuple(max(dim) for dim in zip(*shapes))
    return [build_batch(p, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        max_pages_per_seq=max_pages_per_seq, shape=shape) for p in plans]


def build_batch(plan: StepPlan, *, max_num_seqs: int, max_num_batched_tokens: int, max_pages_per_seq: int,
                shape: tuple[int, int, int] | None = None) -> StepBatch:
    """`plan` as fixed-shape arrays, padded to its own `batch_shape` or to `shape` (at least as large)."""
    chunks = plan.chunks
    seqs, num_tokens, num_logprobs = shape or batch_shape(plan, max_num_seqs=max_num_seqs,
                                                          max_num_batched_tokens=max_num_batched_tokens)
    tokens = np.zeros(num_tokens, np.int32)
    positions = np.full(num_tokens, -1, np.int32)
    seq_ids = np.zeros(num_tokens, np.int32)
    page_table = np.zeros((seqs, max_pages_per_seq), np.int32)
    logit_rows = np.zeros(seqs, np.int32)
    temperature = np.zeros(seqs, np.float32)
    top_p = np.ones(seqs, np.float32)
    top_k = np.zeros(seqs, np.int32)
    seeds = np.zeros(seqs, np.uint32)
    steps = np.zeros(seqs, np.int32)
    row = 0
    for i, chunk in enumerate(chunks):
        seq, n = chunk.seq, chunk.num_tokens
        tokens[row:row + n] = seq.all_ids[chunk.start:chunk.start + n]
        positions[row:row + n] = np.arange(chunk.start, chunk.start + n)
        seq_ids[row:row + n] = i
        page_table[i, :len(seq.pages)] = seq.pages
        logit_rows[i] = row + n - 1
        sp = seq.sampling
        temperature[i], top_p[i], top_k[i] = sp.temperature, sp.top_p, sp.top_k
        seeds[i], steps[i] = seq.seed, len(seq.output_ids)
        row += n
    return StepBatch(plan.decode, num_logprobs, tokens, positions, seq_ids, page_table,
                     logit_rows, temperature, top_p, top_k, seeds, steps)
