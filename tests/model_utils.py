"""Helpers shared by the model tests: tiny configs and step batches over shuffled page tables."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from msjax.config import ModelConfig
from msjax.kv_cache import AttentionBatch, KVCache


def tiny_config(**overrides) -> ModelConfig:
    base = dict(architecture="MixtralForCausalLM", vocab_size=61, hidden_size=32, num_layers=3, num_heads=6,
                num_kv_heads=3, head_dim=8, num_experts=5, top_k=2, expert_ffn_size=24)
    base.update(overrides)
    return ModelConfig(**base)


def shuffled_page_table(num_seqs: int, pages_per_seq: int, seed: int = 0) -> np.ndarray:
    """Each sequence gets pages in a random, non-contiguous order (as a real allocator hands them out)."""
    pages = np.random.default_rng(seed).permutation(num_seqs * pages_per_seq)
    return pages.reshape(num_seqs, pages_per_seq).astype(np.int32)


def prefill_batch(prompts: list[list[int]], page_table: np.ndarray):
    """(tokens, batch, rows of each prompt's last token) for a flat prefill of whole prompts."""
    tokens = np.concatenate([np.asarray(p, np.int32) for p in prompts])
    positions = np.concatenate([np.arange(len(p), dtype=np.int32) for p in prompts])
    seq_ids = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(prompts)])
    batch = AttentionBatch(jnp.asarray(positions), jnp.asarray(seq_ids), jnp.asarray(page_table))
    return jnp.asarray(tokens), batch


def decode_token_by_token(model, prompt: list[int], page_size: int, seed: int = 0) -> np.ndarray:
    """Feed `prompt` one token per decode step through the paged cache; logits [len, vocab] of every step."""
    pages = -(-len(prompt) // page_size) + 1
    table = jnp.asarray(shuffled_page_table(1, pages, seed))
    kv = KVCache.create(model.cfg, pages + 3, page_size, dtype=model.dtype)
    out = []
    for pos, token in enumerate(prompt):
        batch = AttentionBatch(jnp.array([pos], jnp.int32), jnp.zeros(1, jnp.int32), table)
        logits, kv = model.forward(jnp.array([token], jnp.int32), batch, kv, jnp.arange(1), decode=True)
        out.append(np.asarray(logits[0]))
    return np.stack(out)


def run_requests(engine, requests, before_step=None) -> dict[str, tuple[list[int], list[dict]]]:
    """Add (request_id, prompt, SamplingParams) requests, step to the end: {request_id: (tokens, logprobs)}.
    `before_step(i)`, if given, runs before step i (e.g. a rebalance mid-run)."""
    out: dict[str, tuple[list[int], list[dict]]] = {}
    for rid, prompt, sp in requests:
        engine.add_request(rid, prompt, sp)
    step = 0
    while engine.has_unfinished():
        if before_step is not None:
            before_step(step)
        step += 1
        for d in engine.step():
            tokens, lps = out.setdefault(d.request_id, ([], []))
            tokens += d.token_ids
            lps += d.logprobs or []
    return out


def assert_same_outputs(got, want) -> None:
    """`run_requests` results of two deployments: the same tokens, and each step's top logprobs within 1e-4 of
    their scale."""
    for rid, (tokens, lps) in want.items():
        assert got[rid][0] == tokens, rid
        for mine, theirs in zip(got[rid][1], lps):
            a = np.array([mine[t] for t in theirs])
            b = np.array(list(theirs.values()))
            assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b)) + 1e-6, rid


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, *, page_size: int = 16,
                    plan=None) -> list[list[int]]:
    """Each prompt continued greedily by `max_new_tokens` tokens (EOS ignored) through the engine, as a user's
    requests run: what the golden tests compare with HF's `generate`."""
    from msjax import EngineConfig, SamplingParams
    from msjax.engine.engine import Engine
    longest = max(len(p) for p in prompts) + max_new_tokens
    pages = -(-longest // page_size)
    config = EngineConfig(page_size=page_size, num_pages=len(prompts) * pages + 1, max_num_seqs=len(prompts),
                          max_num_batched_tokens=max(sum(len(p) for p in prompts), 16), max_model_len=longest)
    engine = Engine(model, config, plan=plan, eos_token_ids=())
    sampling = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    try:
        out = run_requests(engine, [(str(i), list(p), sampling) for i, p in enumerate(prompts)])
    finally:
        engine.close()
    return [out[str(i)][0] for i in range(len(prompts))]


def run_segments() -> set[str]:
    """Shared-memory segments of node runners' M2N channels now in /dev/shm (a deployment must leave none)."""
    return {p.name for p in Path("/dev/shm").glob("msjax-m2n-mp*")}
