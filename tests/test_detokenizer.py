"""Incremental detokenization (Engine._new_text): the streamed text equals a full decode of the output at every
token, for a byte-level tokenizer whose tokens split multi-byte characters, with and without stop strings."""

import types

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from msjax.engine.engine import REPLACEMENT_CHAR, Engine, _Detokenizer

TEXT = "héllo wörld, 日本語 and 🙂 emoji — done"


@pytest.fixture(scope="module")
def byte_tokenizer():
    """One token per byte (the GPT-2 byte alphabet), so most non-ASCII characters span several tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def stream(tokenizer, ids, stop=None):
    """What _new_text emits token by token, and the finish reason."""
    engine = types.SimpleNamespace(tokenizer=tokenizer, _detok={"r": _Detokenizer()})
    engine._decoded = lambda d, out, final: Engine._decoded(engine, d, out, final)
    seq = types.SimpleNamespace(request_id="r", output_ids=[], sampling=types.SimpleNamespace(stop=stop))
    pieces, reason = [], None
    for i, token in enumerate(ids):
        seq.output_ids.append(token)
        last = "length" if i == len(ids) - 1 else None
        new, reason = Engine._new_text(engine, seq, last)
        pieces.append(new)
        assert REPLACEMENT_CHAR not in new or last  # a split character is held back, never shown half
        if reason is not None:
            break
    return pieces, reason


def test_streamed_text_is_the_full_decode(byte_tokenizer):
    ids = byte_tokenizer.encode(TEXT).ids
    assert len(ids) > len(TEXT)  # multi-byte characters span tokens
    pieces, reason = stream(byte_tokenizer, ids)
    assert "".join(pieces) == byte_tokenizer.decode(ids) == TEXT and reason == "length"
    # every prefix: what was emitted so far is the full decode minus at most a held-back partial character
    for n in range(1, len(ids)):
        emitted = "".join(stream(byte_tokenizer, ids[:n] + [ids[n]])[0][:n])
        full = byte_tokenizer.decode(ids[:n])
        assert full.startswith(emitted) and set(full[len(emitted):]) <= {REPLACEMENT_CHAR}


def test_stop_string_across_split_characters(byte_tokenizer):
    ids = byte_tokenizer.encode(TEXT).ids
    pieces, reason = stream(byte_tokenizer, ids, stop=["語 and"])
    assert "".join(pieces) == "héllo wörld, 日本" and reason == "stop"


@pytest.mark.parametrize("rewrite", [
    lambda text: text.lstrip(" "),  # SentencePiece-like: the text's leading space dropped, wherever it starts
    lambda text: text.replace("ab", "X"),  # a window's text that is not its prefix's plus more: full decode
])
def test_window_text_matches_full_decode_for_context_sensitive_decoders(byte_tokenizer, rewrite):
    class Decoder:
        def decode(self, ids, skip_special_tokens=True):
            return rewrite(byte_tokenizer.decode(ids))

    decoder, ids = Decoder(), byte_tokenizer.encode(" ab cab abab").ids
    engine = types.SimpleNamespace(tokenizer=decoder)
    d = _Detokenizer()
    for n in range(1, len(ids) + 1):
        assert Engine._decoded(engine, d, ids[:n], final=False) == decoder.decode(ids[:n])
