"""Train `tiny-moe`, the embedded default model, and write it as an HF Mixtral checkpoint directory.

The text is the Zen of Python, which ships with Python itself (`this` module), so nothing is downloaded and no
foreign text is committed. The model is trained through msjax's own serving forward pass (prefill over the paged
KV cache), so what it learned is exactly what the engine computes; the written checkpoint is then loaded back
through the normal loader and must reproduce the text greedily.

    .venv/bin/python tools/train_tiny_moe.py --out msjax/models/tiny_moe
"""

from __future__ import annotations

import argparse
import codecs
import json
import shutil
import contextlib
import io
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from msjax.config import ModelConfig, RopeConfig
from msjax.kv_cache import AttentionBatch, KVCache
from msjax.models.modules import AttentionRole, ExpertRole
from msjax.models.programs import colocated_logits

BOS, EOS = "<s>", "</s>"
with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
    import this
TEXT = codecs.decode(this.s, "rot13") + "\n"
SHAPE = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, num_experts=8, top_k=2,
             expert_ffn_size=192)


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return tok


def make_config(vocab_size: int, bos: int, eos: int) -> ModelConfig:
    return ModelConfig(architecture="MixtralForCausalLM", vocab_size=vocab_size, rope=RopeConfig(10000.0),
                       norm_eps=1e-5, max_position_embeddings=512, bos_token_id=bos, eos_token_ids=(eos,),
                       **SHAPE)


def windows(ids: np.ndarray, length: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Random crops of the token stream [batch, length + 1] (inputs and shifted targets)."""
    starts = rng.integers(0, len(ids) - length - 1, size=batch)
    return np.stack([ids[s:s + length + 1] for s in starts])


def train(cfg: ModelConfig, ids: np.ndarray, steps: int, seed: int):
    rngs = nnx.Rngs(seed)
    # the reference expert path: the CPU custom call (msjax.models.cpu_experts) has no gradient
    attention, experts = AttentionRole(cfg, rngs=rngs), ExpertRole(cfg, rngs=rngs, kernels="reference")
    graph_a, params_a = nnx.split(attention)
    graph_e, params_e = nnx.split(experts)
    length, batch, page_size = 128, 8, 16
    pages = length // page_size
    # Each window is its own sequence with its own pages, laid out contiguously.
    seq_batch = AttentionBatch(
        positions=jnp.tile(jnp.arange(length, dtype=jnp.int32), batch),
        seq_ids=jnp.repeat(jnp.arange(batch, dtype=jnp.int32), length),
        page_table=jnp.arange(batch * pages, dtype=jnp.int32).reshape(batch, pages))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, steps, 1e-4)
    opt = optax.adamw(schedule, weight_decay=0.0)
    params = (params_a, params_e)
    opt_state = opt.init(params)

    def loss_fn(params, tokens):  # tokens [batch, length + 1]
        kv = KVCache.create(cfg, batch * pages, page_size)
        logits, _ = colocated_logits(nnx.merge(graph_a, params[0]), nnx.merge(graph_e, params[1]),
                                     tokens[:, :-1].reshape(-1), seq_batch, kv, jnp.arange(batch * length),
                                     decode=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:].reshape(-1)).mean()

    @jax.jit
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jnp.asarray(windows(ids, length, batch, rng)))
        if i % 100 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(loss):.4f}", flush=True)
    return nnx.merge(graph_a, params[0]), nnx.merge(graph_e, params[1])


def hf_tensors(cfg: ModelConfig, attention: AttentionRole, experts: ExpertRole) -> dict[str, np.ndarray]:
    """msjax weights under Mixtral's HF names ([out, in] linear weights), in bfloat16."""
    def t(x):
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32).T)

    f = cfg.expert_ffn_size
    out = {"model.embed_tokens.weight": np.asarray(attention.embed[...]),
           "model.norm.weight": np.asarray(attention.final_norm[...]),
           "lm_head.weight": t(attention.lm_head[...])}
    for l in range(cfg.num_layers):
        p = f"model.layers.{l}"
        out[f"{p}.input_layernorm.weight"] = np.asarray(attention.input_norm[l])
        out[f"{p}.post_attention_layernorm.weight"] = np.asarray(attention.post_norm[l])
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[f"{p}.self_attn.{theirs}.weight"] = t(getattr(attention, ours)[l])
        out[f"{p}.block_sparse_moe.gate.weight"] = t(attention.router[l])
        for e in range(cfg.num_experts):
            gate_up, down = np.asarray(experts.w_gate_up[l, e]), np.asarray(experts.w_down[l, e])
            q = f"{p}.block_sparse_moe.experts.{e}"
            out[f"{q}.w1.weight"], out[f"{q}.w3.weight"] = t(gate_up[:, :f]), t(gate_up[:, f:])
            out[f"{q}.w2.weight"] = t(down)
    import ml_dtypes
    return {k: np.ascontiguousarray(np.asarray(v, np.float32).astype(ml_dtypes.bfloat16)) for k, v in out.items()}


def hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.expert_ffn_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope.theta, "sliding_window": None, "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k, "tie_word_embeddings": False, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0], "torch_dtype": "bfloat16", "transformers_version": "4.57.6",
        "attention_dropout": 0.0, "initializer_range": 0.02, "output_router_logits": False,
        "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0, "use_cache": True,
    }


def write_checkpoint(out: Path, cfg: ModelConfig, tok: Tokenizer, attention, experts) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0]}, indent=2) + "\n")
    save_file(hf_tensors(cfg, attention, experts), str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
         "add_bos_token": False, "model_max_length": cfg.max_position_embeddings}, indent=2) + "\n")
    (out / "README.md").write_text(
        "# tiny-moe\n\nmsjax's embedded default: a 4-layer Mixtral-architecture MoE (8 experts, top-2, GQA 4/2)\n"
        "trained by `tools/train_tiny_moe.py` on the Zen of Python (the `this` module of the standard library).\n"
        "It exists so that demos print real text and a broken pipeline shows at once.\n")


def check_reproduces(out: Path, ids: list[int]) -> None:
    """Load the written checkpoint through the normal loader and continue a prompt taken from the text."""
    from msjax import EngineConfig, SamplingParams
    from msjax.checkpoint import load_model
    from msjax.engine.engine import Engine
    model = load_model(out)
    start, prompt_len, new = 40, 12, 60
    engine = Engine(model, EngineConfig(max_model_len=prompt_len + new), eos_token_ids=())
    engine.add_request("check", ids[start:start + prompt_len], SamplingParams(max_tokens=new, temperature=0.0))
    got = []
    while engine.has_unfinished():
        got += [t for d in engine.step() for t in d.token_ids]
    want = ids[start + prompt_len:start + prompt_len + new]
    print(f"reproduction: {sum(a == b for a, b in zip(got, want))}/{new} tokens match")
    if got != want:
        raise SystemExit("the written checkpoint does not reproduce its training text; train longer")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("msjax/models/tiny_moe"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--vocab", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tok = train_tokenizer(args.vocab)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    # The stream repeats the text between BOS/EOS so windows also learn the wrap-around.
    text_ids = tok.encode(TEXT).ids
    ids = np.array(([bos] + text_ids + [eos]) * 8, dtype=np.int32)
    cfg = make_config(tok.get_vocab_size(), bos, eos)
    print(f"text: {len(TEXT)} chars, {len(text_ids)} tokens; vocab {cfg.vocab_size}; {cfg.param_count():,} params")
    attention, experts = train(cfg, ids, args.steps, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), cfg, tok, attention, experts)
        check_reproduces(Path(tmp), text_ids)
        shutil.rmtree(args.out, ignore_errors=True)
        shutil.copytree(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
