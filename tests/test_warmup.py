"""The warm-up's shape enumeration (device-free): every step the engine can build pads to one of
`replica_shapes`, and the mixed steps give the expert nodes every rounds layout the runner can send. The end-to-end
check (a warmed-up server compiles nothing more) is in tests/test_serving_config.py and the soak."""

import random
import types

import pytest

from msjax.engine.batch import batch_shape
from msjax.engine.engine import split_micro_batches
from msjax.engine.scheduler import Chunk, StepPlan
from msjax.engine.warmup import ReplicaShape, padding_batch, replica_shapes, warmup_steps


def _chunk(tokens: int, logprobs=None) -> Chunk:
    seq = types.SimpleNamespace(sampling=types.SimpleNamespace(logprobs=logprobs))
    return Chunk(seq, 0, tokens)


def _shape(decode: bool, chunks: list[Chunk], m: int, seqs: int, budget: int) -> ReplicaShape:
    parts = split_micro_batches(chunks, m)
    shapes = [batch_shape(StepPlan(decode, part), max_num_seqs=seqs, max_num_batched_tokens=budget)
              for part in parts]
    s, t, _ = (max(dim) for dim in zip(*shapes))
    return ReplicaShape(decode, s, t, len(parts))


@pytest.mark.parametrize("seqs, budget, m", [(16, 256, 2), (8, 64, 2), (2, 32, 1), (6, 100, 3), (16, 48, 4)])
def test_every_step_the_engine_builds_is_a_warmup_shape(seqs, budget, m):
    shapes = set(replica_shapes(seqs, budget, m))
    rng = random.Random(0)
    for n in range(1, seqs + 1):  # decode: n sequences, one token each
        assert _shape(True, [_chunk(1) for _ in range(n)], m, seqs, budget) in shapes
    for _ in range(2000):  # prefill: up to `seqs` chunks within the token budget
        n = rng.randint(1, seqs)
        cuts = sorted(rng.sample(range(1, budget), min(n - 1, budget - 1))) if n > 1 else []
        total = rng.randint(max(n, 1), budget)
        sizes = [max(1, b - a) for a, b in zip([0, *cuts], [*cuts, total])][:n]
        sizes = [s for s in sizes if s > 0]
        if sum(sizes) > budget:
            continue
        assert _shape(False, [_chunk(s) for s in sizes], m, seqs, budget) in shapes, sizes


def test_mixed_steps_cover_every_rounds_layout():
    """With the runner's one packet capacity per step, an expert node's program depends on which attention nodes
    send in each round and on that capacity: every layout two attention nodes can make is among the warm-up's."""
    seqs, budget, m = 16, 256, 2
    shapes = replica_shapes(seqs, budget, m)

    def layout(step):
        cap = max(s.tokens for s in step if s)
        return tuple(tuple(a for a, s in enumerate(step) if s and i < s.micro_batches)
                     for i in range(max(s.micro_batches for s in step if s))), cap

    warm = {layout(step) for step in warmup_steps(2, shapes, m)}
    for a in [None, *shapes]:
        for b in [None, *shapes]:
            if a or b:
                assert layout((a, b)) in warm, (a, b)


def test_padding_batch_writes_nothing():
    batch = padding_batch(ReplicaShape(False, 4, 32, 2), 20, max_pages_per_seq=5)
    assert batch.tokens.shape == (32,) and (batch.positions == -1).all() and batch.page_table.shape == (4, 5)
    assert batch.num_logprobs == 20 and not batch.decode
