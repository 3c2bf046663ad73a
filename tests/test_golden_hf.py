"""Numerics against HF transformers: tiny random checkpoints of every family, written with transformers 4.x and
5.x by tools/make_hf_goldens.py, loaded through the normal loader. Float32, 1e-4 relative to the logits' scale.

Both paths are checked: prefill of the whole prompt, and token-by-token decode through the paged cache with a
page size smaller than the prompt and a shuffled page table.
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from msjax.checkpoint import load_model
from msjax.kv_cache import KVCache
from tests.model_utils import decode_token_by_token, greedy_generate, prefill_batch, shuffled_page_table

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "golden.json").exists())
RTOL = 1e-4


def test_every_family_and_both_transformers_majors_are_covered():
    goldens = [json.loads((FIXTURES / n / "golden.json").read_text()) for n in NAMES]
    assert {g["architecture"] for g in goldens} == {"MixtralForCausalLM", "Qwen2MoeForCausalLM",
                                                    "Qwen3MoeForCausalLM", "OlmoeForCausalLM", "DbrxForCausalLM"}
    assert {g["transformers_version"].split(".")[0] for g in goldens} == {"4", "5"}


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    golden = json.loads((FIXTURES / request.param / "golden.json").read_text())
    return load_model(FIXTURES / request.param), golden


def _assert_close(got: np.ndarray, want: np.ndarray, what: str):
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < RTOL, f"{what}: max error {err:.2e} of the logits' scale (limit {RTOL})"


def test_prefill_logits_match_hf(case):
    model, golden = case
    prompts = golden["prompts"]
    page_size = 4
    pages = max(-(-len(p) // page_size) for p in prompts)
    tokens, batch = prefill_batch(prompts, shuffled_page_table(len(prompts), pages))
    kv = KVCache.create(model.cfg, len(prompts) * pages, page_size)
    logits, _ = model.forward(tokens, batch, kv, jnp.arange(tokens.shape[0]), decode=False)
    logits = np.asarray(logits)
    start = 0
    for prompt, want in zip(prompts, golden["logits"]):
        _assert_close(logits[start:start + len(prompt)], np.asarray(want, np.float32), "prefill")
        start += len(prompt)


def test_decode_through_paged_cache_matches_hf(case):
    model, golden = case
    prompt, want = golden["prompts"][-1], np.asarray(golden["logits"][-1], np.float32)
    got = decode_token_by_token(model, prompt, page_size=4, seed=7)  # 19 tokens over 5 shuffled pages
    _assert_close(got, want, "token-by-token decode")


def test_greedy_continuation_matches_hf(case):
    model, golden = case
    assert greedy_generate(model, golden["prompts"], len(golden["greedy"][0]), page_size=4) == golden["greedy"]
