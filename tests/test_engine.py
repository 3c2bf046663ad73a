"""The engine on the real model (tiny-moe, float32): continuous batching is exact, seeded sampling does not
depend on the batch, and the LLM API speaks vLLM's names."""

import numpy as np
import pytest

import msjax
from msjax import SamplingParams
from msjax.engine.engine import Engine
from msjax.runtime.colocated import ColocatedRunner
from tests.model_utils import run_requests

CACHE = dict(page_size=8, num_pages=48, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)


@pytest.fixture(scope="module")
def zen_ids():
    from tests.test_tiny_moe import ZEN
    tok = msjax.LLM("tiny-moe").get_tokenizer()
    return tok.encode(ZEN).ids


def _requests(zen_ids):
    """50 requests: prompts of 2 to 150 tokens (from the text, and random ids), outputs of 1 to 40 tokens,
    greedy, with every fifth one sampled from its own seed."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(50):
        n = int(rng.integers(2, 150))
        if i % 3 == 2:
            prompt = rng.integers(0, 320, size=n).tolist()
        else:
            start = int(rng.integers(0, len(zen_ids) - n))
            prompt = zen_ids[start:start + n]
        sampled = i % 5 == 4
        sp = SamplingParams(max_tokens=int(rng.integers(1, 41)), temperature=0.8 if sampled else 0.0,
                            top_p=0.9, top_k=50 if sampled else 0, seed=i, logprobs=2, ignore_eos=True)
        out.append((f"r{i}", prompt, sp))
    return out


@pytest.mark.slow
def test_continuous_batching_is_exact(zen_ids):
    requests = _requests(zen_ids)
    # alone: one sequence at a time, whole prompts in one prefill, a cache with room to spare
    alone_engine = Engine.from_pretrained("tiny-moe", page_size=8, num_pages=64, max_num_seqs=1,
                                          max_num_batched_tokens=256, max_model_len=256)
    alone = run_requests(alone_engine, requests)
    # together: a cache far too small for 50 requests, a budget that chunks long prompts
    engine = Engine.from_pretrained("tiny-moe", **CACHE)
    compiled = ColocatedRunner.num_compiled()
    together = run_requests(engine, requests)
    # fixed bucket shapes: decode batches of 1, 2, 4, 8 and prefill steps of 16, 32, 64 tokens, nothing more
    assert ColocatedRunner.num_compiled() - compiled <= 7
    assert engine.stats.num_preemptions > 0 and engine.stats.num_partial_prefill_chunks > 0
    assert engine.num_free_pages() == CACHE["num_pages"]  # every page came back
    differing = 0
    for rid, _, sp in requests:
        want, got = alone[rid][0], together[rid][0]
        if want == got:
            continue
        differing += 1
        i = next(k for k, (a, b) in enumerate(zip(want, got)) if a != b)
        top2 = sorted(alone[rid][1][i].values(), reverse=True)[:2]
        # a different token is only acceptable where the model was split between two (a float-noise tie)
        assert top2[0] - top2[1] < 1e-5, f"{rid} differs at token {i} with a top-2 logprob gap of {top2[0] - top2[1]}"
    print(f"{differing} of {len(requests)} requests differ, each at a float-noise tie")


@pytest.mark.slow  # full suite only: the quick subset stays under 5 minutes
def test_seeded_sampling_is_batch_independent():
    llm = msjax.LLM("tiny-moe", max_num_seqs=4)
    noise = [5, 77, 190, 33, 250, 12]  # off the training text, so the next-token distribution is wide
    sp = SamplingParams(max_tokens=12, temperature=1.5, seed=123)
    alone = llm.generate(noise, sp)[0].token_ids
    batch = llm.generate(["Flat is", noise, "Errors should"],
                         [SamplingParams(max_tokens=20, temperature=0.7, seed=5), sp,
                          SamplingParams(max_tokens=7)])
    assert batch[1].token_ids == alone
    other_seed = llm.generate(noise, SamplingParams(max_tokens=12, temperature=1.5, seed=124))
    assert other_seed[0].token_ids != alone  # the seed matters


@pytest.mark.slow  # full suite only: the quick subset stays under 5 minutes
def test_llm_api_vllm_names():
    llm = msjax.LLM("tiny-moe")
    out = llm.generate(["Beautiful is better than", [1, 2, 3]],
                       SamplingParams(max_tokens=30, temperature=0, stop=["\n"], logprobs=3))
    assert out[0].text == " ugly." and out[0].finish_reason == "stop"
    assert out[0].prompt == "Beautiful is better than" and out[1].prompt is None
    assert len(out[0].logprobs) == len(out[0].token_ids)
    assert all(len(lp) in (3, 4) and max(lp.values()) <= 0 for lp in out[0].logprobs)
    eos = llm.generate("Namespaces are one honking great idea -- let's do more of those!\n",
                       SamplingParams(max_tokens=50, temperature=0))[0]
    assert eos.finish_reason == "stop" and eos.token_ids[-1] in llm.engine.eos_token_ids  # trained to stop
    assert llm.generate("Flat", SamplingParams(max_tokens=2))[0].finish_reason == "length"


def test_llm_bad_input():
    llm = msjax.LLM("tiny-moe")
    with pytest.raises(msjax.InvalidRequestError, match="prompt: is empty"):
        llm.generate([""])
    with pytest.raises(ValueError, match="sampling"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="prompt"):
        llm.generate("x" * 2000)
    with pytest.raises(ValueError, match="plan"):
        msjax.LLM("tiny-moe", plan="plan.toml")
    assert llm.generate("Flat is", SamplingParams(max_tokens=3, temperature=0))[0].text == " better than n"
