"""The sampler's two run-time paths: an all-greedy batch skips the vocabulary sort, and must choose exactly the
tokens (and logprobs) the sorting path chooses for its greedy rows, ties included."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from msjax.runtime.sampler import sample

SAMPLE = jax.jit(partial(sample, num_logprobs=3))


def _args(logits, temperature):
    n = logits.shape[0]
    return (jnp.asarray(logits, jnp.float32), jnp.asarray(temperature, jnp.float32), jnp.zeros(n, jnp.int32),
            jnp.full(n, 0.9, jnp.float32), jnp.arange(n, dtype=jnp.uint32), jnp.zeros(n, jnp.int32))


def test_all_greedy_batch_matches_the_greedy_rows_of_a_mixed_batch():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 50)).astype(np.float32)
    logits[2, [7, 31]] = logits[2].max() + 1.0  # a tie: both paths take the lower index
    logits[4, :] = 0.0  # all equal
    greedy = SAMPLE(*_args(logits, np.zeros(6)))
    mixed = SAMPLE(*_args(logits, [0, 0, 0, 0, 0, 1.0]))  # one sampled row sends the batch down the sort path
    assert np.asarray(greedy.tokens)[2] == 7 and np.asarray(greedy.tokens)[4] == 0
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(np.asarray(greedy.tokens)[:5], np.asarray(mixed.tokens)[:5])
    np.testing.assert_allclose(np.asarray(greedy.logprobs)[:5], np.asarray(mixed.logprobs)[:5], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(greedy.top_ids), np.asarray(mixed.top_ids))


def test_sampled_rows_follow_their_seed():
    logits = np.zeros((64, 50), np.float32)  # uniform: a seeded draw, not the argmax
    out = np.asarray(SAMPLE(*_args(logits, np.ones(64))).tokens)
    assert len(set(out.tolist())) > 10
    again = np.asarray(SAMPLE(*_args(logits, np.ones(64))).tokens)
    np.testing.assert_array_equal(out, again)
