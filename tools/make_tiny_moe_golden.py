"""HF transformers' view of the embedded `tiny-moe`: proof that the committed checkpoint is a real HF model.

Run under a Python 3.11 venv with torch CPU and transformers (see tools/README.md), from the repo root:

    python tools/make_tiny_moe_golden.py  # writes tests/fixtures/tiny_moe_hf_golden.json
"""

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = Path("msjax/models/tiny_moe")
OUT = Path("tests/fixtures/tiny_moe_hf_golden.json")
PROMPT = "Beautiful is better than"


def main():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(MODEL)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    OUT.write_text(json.dumps({
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
        "prompt": PROMPT, "prompt_ids": ids[0].tolist(), "logits": logits.tolist(),
        "greedy_ids": new, "greedy_text": tok.decode(new)}) + "\n")
    print(f"wrote {OUT}: {tok.decode(new)!r}")


if __name__ == "__main__":
    main()
