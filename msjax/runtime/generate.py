"""Greedy generation for a fixed set of prompts on the colocated model: prefill every prompt in one step, then
decode them together. The demo and the numerics tests use it; serving goes through the engine (msjax.engine)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from msjax.errors import ConfigError
from msjax.kv_cache import AttentionBatch, KVCache
from msjax.models.programs import MoEModel


def greedy_generate(model: MoEModel, prompts: list[list[int]], max_new_tokens: int, *, page_size: int = 16,
                    stop_token_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """Continue each prompt (token ids) greedily by up to `max_new_tokens` tokens, stopping a sequence early at
    a token in `stop_token_ids` (which is included)."""
    cfg = model.cfg
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompt", "every prompt needs at least one token")
    if max_new_tokens <= 0:
        raise ConfigError("max_tokens", f"must be > 0, got {max_new_tokens}")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ConfigError("prompt", f"token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > cfg.max_position_embeddings:
        raise ConfigError("max_tokens", f"prompt + max_tokens = {longest} exceeds the context of "
                          f"{cfg.max_position_embeddings}")
    n = len(prompts)
    pages_per_seq = -(-longest // page_size)
    kv = KVCache.create(cfg, n * pages_per_seq, page_size, dtype=model.dtype)
    page_table = jnp.arange(n * pages_per_seq, dtype=jnp.int32).reshape(n, pages_per_seq)

    tokens = np.concatenate([np.asarray(p, np.int32) for p in prompts])
    positions = np.concatenate([np.arange(len(p), dtype=np.int32) for p in prompts])
    seq_ids = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(prompts)])
    last_rows = np.cumsum([len(p) for p in prompts]) - 1
    batch = AttentionBatch(jnp.asarray(positions), jnp.asarray(seq_ids), page_table)
    logits, kv = model.forward(jnp.asarray(tokens), batch, kv, jnp.asarray(last_rows), decode=False)

    outputs: list[list[int]] = [[] for _ in prompts]
    lengths = np.array([len(p) for p in prompts], np.int32)
    done = np.zeros(n, bool)
    for _ in range(max_new_tokens):
        next_tokens = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
        for i in np.flatnonzero(~done):
            outputs[i].append(int(next_tokens[i]))
            done[i] |= int(next_tokens[i]) in stop_token_ids or len(outputs[i]) == max_new_tokens
        if done.all():
            break
        # Finished sequences ride along as padding (position -1) so the decode shape stays fixed.
        positions = np.where(done, -1, lengths).astype(np.int32)
        batch = AttentionBatch(jnp.asarray(positions), jnp.arange(n, dtype=jnp.int32), page_table)
        logits, kv = model.forward(jnp.asarray(next_tokens), batch, kv, jnp.arange(n), decode=True)
        lengths += 1
    return outputs
