"""The peer: HF transformers decoding the same checkpoint as bench/decode.py, run in the peer venv (torch CPU).

    .venv-peer/bin/python bench/peer_hf.py --model-dir DIR --batch-sizes 1,8,32 [--prompt-len 32]
        [--max-tokens 64] [--dtype float32] [--rounds 3]

Started by `bench/decode.py --peer hf` in a subprocess (tools/setup-peer.sh makes the venv); prints one JSON
object per batch size on stdout. Each batch runs B requests of the same prompts bench/decode.py gives msjax
(request i: token (7 i + j) mod vocab at position j, no padding), greedy, every one generating `max_tokens`
tokens (EOS ignored, as msjax's ignore_eos). A decode step's time is the gap between two consecutive calls of a
logits processor, which `generate` calls once per step right after the model's forward: so it holds the forward
and all of generate's own per-step work, as msjax's step time holds its engine's. Static KV cache
(`cache_implementation="static"`, HF's fastest eager decode) where the model supports it, else the dynamic one;
the rows say which. Best of `rounds` rounds after a warm-up round, as bench/decode.py does.

This file imports torch and transformers: it never runs in the project's venv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# not this script's folder on the path: bench/kernels.py would shadow the `kernels` package transformers probes
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList  # noqa: E402


class StepClock(LogitsProcessor):
    """Records when generate reaches the sampling of each step (after that step's forward)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def prompts(batch: int, prompt_len: int, vocab: int) -> torch.Tensor:  # [batch, prompt_len] int64
    return torch.tensor([[(7 * i + j) % vocab for j in range(prompt_len)] for i in range(batch)])


def run(model, ids: torch.Tensor, max_tokens: int, cache: str | None) -> dict:
    clock = StepClock()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                             cache_implementation=cache, pad_token_id=0, eos_token_id=None)
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]  # decode steps; the first call ends the prefill
    return {"prefill_s": clock.times[0] - started, "step_times": steps,
            "first_ids": out[0, ids.shape[1]:].tolist()}


def supports_static_cache(model) -> bool:
    """Whether `generate(cache_implementation="static")` works for this model (tried on two tokens)."""
    try:
        run(model, prompts(1, 2, model.config.vocab_size), 2, "static")
        return True
    except Exception as err:  # noqa: BLE001 - any refusal means: use the dynamic cache, and say so
        print(f"peer_hf: static cache refused ({type(err).__name__}: {err}); using the dynamic cache",
              file=sys.stderr)
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()
    cache = "static" if supports_static_cache(model) else None
    vocab = model.config.vocab_size
    for b in (int(x) for x in args.batch_sizes.split(",")):
        ids = prompts(b, args.prompt_len, vocab)
        run(model, ids, 4, cache)  # warm-up: allocator, threads, the static cache of this shape
        best = min((run(model, ids, args.max_tokens, cache) for _ in range(args.rounds)),
                   key=lambda r: statistics.median(r["step_times"]))
        step = statistics.median(best["step_times"])
        print(json.dumps({"impl": "hf", "batch": b, "step_ms": round(1e3 * step, 3),
                          "tok_s": round(b * len(best["step_times"]) / sum(best["step_times"]), 1),
                          "prefill_ms": round(1e3 * best["prefill_s"], 1), "dtype": args.dtype,
                          "first_ids": best["first_ids"], "cache": cache or "dynamic",
                          "version": f"transformers {transformers.__version__}, torch {torch.__version__}, "
                                     f"{torch.get_num_threads()} threads"}), flush=True)


if __name__ == "__main__":
    main()
