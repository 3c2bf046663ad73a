"""The embedded default `tiny-moe` is a trained model: it reproduces its training text, HF-format and all."""

import codecs
import contextlib
import io
import json

import pytest

from msjax.cli import main
from msjax.loading import load, resolve_model_path
from msjax.tokenizer import load_tokenizer
from tests.model_utils import greedy_generate

with contextlib.redirect_stdout(io.StringIO()):
    import this
ZEN = codecs.decode(this.s, "rot13") + "\n"


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-moe"), load_tokenizer(resolve_model_path("tiny-moe"))


@pytest.mark.parametrize("start_line", [2, 9, 16])
def test_reproduces_training_text(tiny, start_line):
    model, tok = tiny
    lines = ZEN.splitlines(keepends=True)
    prompt = "".join(lines[start_line:start_line + 1])
    want = tok.encode("".join(lines[start_line + 1:start_line + 3])).ids
    got = greedy_generate(model, [tok.encode(prompt).ids], len(want))[0]
    assert tok.decode(got) == tok.decode(want)


def test_config_is_a_real_moe(tiny):
    cfg = tiny[0].cfg
    assert cfg.architecture == "MixtralForCausalLM"
    assert cfg.num_experts >= 4 and cfg.top_k == 2 and cfg.num_kv_heads < cfg.num_heads


def test_cli_generate_json(capsys):
    assert main(["generate", "--prompt", "Beautiful is better than", "--max-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"].startswith(" ugly")
    assert len(out["token_ids"]) == 4


def test_cli_reports_bad_input(capsys):
    assert main(["generate", "--model", "no-such-model", "--prompt", "x"]) == 2
    assert "unknown preset 'no-such-model'" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--max-tokens", "0"]) == 2
    assert "max_tokens: must be > 0, got 0" in capsys.readouterr().err


def test_matches_hf_transformers(tiny):
    """tools/make_tiny_moe_golden.py ran the committed checkpoint through HF transformers."""
    from pathlib import Path

    import jax.numpy as jnp
    import numpy as np

    from msjax.kv_cache import KVCache
    from tests.model_utils import prefill_batch
    model, tok = tiny
    golden = json.loads((Path(__file__).parent / "fixtures" / "tiny_moe_hf_golden.json").read_text())
    ids = tok.encode(golden["prompt"]).ids
    assert ids == golden["prompt_ids"]  # the same tokenizer as HF's
    tokens, batch = prefill_batch([ids], [[1, 0]])
    logits, _ = model.forward(tokens, batch, KVCache.create(model.cfg, 2, 16), jnp.arange(len(ids)), decode=False)
    want = np.asarray(golden["logits"], np.float32)
    assert np.max(np.abs(np.asarray(logits) - want)) / np.max(np.abs(want)) < 1e-4
    assert greedy_generate(model, [ids], len(golden["greedy_ids"]))[0] == golden["greedy_ids"]
