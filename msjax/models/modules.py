"""The model's two roles as Flax NNX modules, with every layer's weights stacked on a leading layer axis.

`AttentionRole` is what an attention node holds: embeddings, each layer's attention block, router and shared
expert, the final norm and the LM head. `ExpertRole` is what an expert node holds: the routed experts (all, or
the subset `expert_ids`). Both take the layer index as an argument, so one compiled program per role serves
every layer. The forward pass is written once here; `msjax.models.programs` jits it per role.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from msjax.config import ModelConfig
from msjax.kv_cache import AttentionBatch, KVCache
from msjax.models import cpu_experts
from msjax.models.attention import paged_attention
from msjax.models.layers import norm, rms_norm, route, swiglu
from msjax.models.rope import apply_rope, rope_cos_sin, rope_frequencies
from pallas_kernels.grouped_gemm import grouped_ffn
from pallas_kernels.platform import kernel_args

INIT_STD = 0.02


class _Init:
    """Creates parameters with one dtype and one random stream; norms start at one, biases at zero."""

    def __init__(self, dtype, rngs: nnx.Rngs):
        self.dtype, self.rngs = dtype, rngs

    def normal(self, *shape: int) -> nnx.Param:
        return nnx.Param(nnx.initializers.normal(INIT_STD)(self.rngs.params(), shape, self.dtype))

    def ones(self, *shape: int) -> nnx.Param:
        return nnx.Param(jnp.ones(shape, self.dtype))

    def zeros(self, *shape: int) -> nnx.Param:
        return nnx.Param(jnp.zeros(shape, self.dtype))


# auto: Pallas kernels on Hopper GPUs, references elsewhere; interpret: the kernels under the Mosaic GPU
# interpreter (CPU tests of the wiring)
KERNELS = ("auto", "kernel", "reference", "interpret")


def _check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}: expected one of {', '.join(KERNELS)}")
    return kernels


SMALL_MATMUL_ROWS = 16  # up to this many rows a stacked layer weight is read in place (see _layer_matmul)


def _native_cpu(kernels: str) -> bool:
    """Whether the native CPU grouped matmul (msjax.models.cpu_experts) takes this model's matmuls: kernels
    "auto" on the CPU backend, with the native library built."""
    return kernels == "auto" and jax.default_backend() == "cpu" and cpu_experts.available()


def _layer_matmul(x: jax.Array, weights: nnx.Param, layer, kernels: str, out_dtype=None) -> jax.Array:
    """x [rows, k] @ weights[layer] [k, n] (`weights` stacked [layers, k, n]). XLA:CPU copies a layer out of
    stacked weights before its matmul; for a few rows (decode) that copy costs more than the matmul, so on the
    CPU the native grouped matmul reads the layer in place (one group: every row). A state of one layer
    (split_layers) needs no copy and takes the XLA dot, as do many rows (prefill), where XLA's dot is faster."""
    wl = _weight_index(weights, layer)
    if weights.shape[0] > 1 and x.shape[0] <= SMALL_MATMUL_ROWS and _native_cpu(kernels):
        w = weights[...]
        return cpu_experts.grouped_matmul(x, w.reshape(w.shape[0], 1, *w.shape[1:]), wl,
                                          jnp.full((1,), x.shape[0], jnp.int32), out_dtype=out_dtype)
    return jnp.dot(x, weights[wl], preferred_element_type=out_dtype)


def _weight_index(weights: nnx.Param, layer):
    """Where layer `layer`'s weights are: at `layer` in the stacked state, at 0 in a state that holds one layer
    (`msjax.models.layer_states.split_layers`; the KV cache is still indexed by `layer`)."""
    return 0 if weights.shape[0] == 1 else layer


class AttentionRole(nnx.Module):
    # the weights that are not per layer (no leading layer axis): see msjax.models.layer_states
    SHARED_PARAMS = ("embed", "final_norm", "lm_head")

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, kernels: str = "auto"):
        self.cfg = cfg
        self.kernels = _check_kernels(kernels)  # static: "auto" = Pallas kernels on Hopper, references elsewhere
        init = _Init(dtype, rngs)
        n, h, e = cfg.num_layers, cfg.hidden_size, cfg.num_experts
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.embed = init.normal(cfg.vocab_size, h)  # [vocab, hidden]
        self.input_norm = init.ones(n, h)
        self.wq = init.normal(n, h, q)
        self.wk = init.normal(n, h, kv)
        self.wv = init.normal(n, h, kv)
        self.wo = init.normal(n, q, h)
        if cfg.qkv_bias:
            self.bq, self.bk, self.bv = init.zeros(n, q), init.zeros(n, kv), init.zeros(n, kv)
        if cfg.o_bias:
            self.bo = init.zeros(n, h)
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = init.ones(n, cfg.head_dim), init.ones(n, cfg.head_dim)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = init.ones(n, q), init.ones(n, kv)
        self.post_norm = init.ones(n, h)
        self.router = init.normal(n, h, e)  # [layers, hidden, experts]
        if cfg.has_shared_expert:
            self.shared_gate_up = init.normal(n, h, 2 * cfg.shared_expert_ffn_size)
            self.shared_down = init.normal(n, cfg.shared_expert_ffn_size, h)
            if cfg.shared_expert_gated:
                self.shared_gate = init.normal(n, h, 1)
        self.final_norm = init.ones(h)
        if not cfg.tie_word_embeddings:
            self.lm_head = init.normal(h, cfg.vocab_size)  # [hidden, vocab]

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:  # [t] int32 -> [t, hidden]
        return self.embed[...][tokens]

    def logits(self, h: jax.Array) -> jax.Array:  # [t, hidden] -> [t, vocab] float32
        cfg = self.cfg
        x = norm(h, self.final_norm[...], cfg.norm_kind, cfg.norm_eps)
        head = self.embed[...].T if cfg.tie_word_embeddings else self.lm_head[...]
        return jnp.dot(x, head, preferred_element_type=jnp.float32)

    def __call__(self, layer: jax.Array, h: jax.Array, batch: AttentionBatch, kv: KVCache, *, decode: bool):
        """One layer's attention side. h [t, hidden] is the residual stream, complete up to this layer.

        Returns (h, x, topk_ids, topk_weights, kv): h now includes attention and the shared expert; x [t, hidden]
        is the normalised input of the routed experts, which the caller dispatches by topk_ids [t, k] and
        combines with topk_weights [t, k] float32 into h.
        """
        cfg = self.cfg
        wl = _weight_index(self.input_norm, layer)
        with jax.named_scope("attention"):
            x = norm(h, self.input_norm[wl], cfg.norm_kind, cfg.norm_eps)
            q, k, v = (_layer_matmul(x, w, layer, self.kernels) for w in (self.wq, self.wk, self.wv))
            if cfg.qkv_bias:
                q, k, v = q + self.bq[wl], k + self.bk[wl], v + self.bv[wl]
            if cfg.clip_qkv is not None and not cfg.clip_after_qk_norm:
                q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
            if cfg.qk_norm == "full":
                q, k = rms_norm(q, self.q_norm[wl], cfg.norm_eps), rms_norm(k, self.k_norm[wl], cfg.norm_eps)
            tokens = h.shape[0]
            q = q.reshape(tokens, cfg.num_heads, cfg.head_dim)
            k = k.reshape(tokens, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(tokens, cfg.num_kv_heads, cfg.head_dim)
            if cfg.qk_norm == "head":
                q, k = rms_norm(q, self.q_norm[wl], cfg.norm_eps), rms_norm(k, self.k_norm[wl], cfg.norm_eps)
            if cfg.clip_qkv is not None and cfg.clip_after_qk_norm:
                q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
            inv_freq, rope_scale = rope_frequencies(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
            cos, sin = rope_cos_sin(batch.positions, inv_freq, rope_scale)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kv = kv.write(layer, batch.slots(kv.page_size), k, v)
            o = paged_attention(q, kv, layer, batch, scale=cfg.head_dim ** -0.5, decode=decode,
                                kernels=self.kernels)
            o = _layer_matmul(o.reshape(tokens, -1), self.wo, layer, self.kernels)
            if cfg.o_bias:
                o = o + self.bo[wl]
            h = h + o
        with jax.named_scope("router"):
            x = norm(h, self.post_norm[wl], cfg.norm_kind, cfg.norm_eps)
            router_logits = _layer_matmul(x, self.router, layer, self.kernels, out_dtype=jnp.float32)
            topk_ids, topk_weights = route(router_logits, cfg.top_k, cfg.topk_norm_p)
        if cfg.has_shared_expert:
            with jax.named_scope("shared_expert"):
                shared = swiglu(x, self.shared_gate_up[wl], self.shared_down[wl])
                if cfg.shared_expert_gated:
                    shared = shared * jax.nn.sigmoid(jnp.dot(x, self.shared_gate[wl]))
                h = h + shared
        return h, x, topk_ids, topk_weights, kv


class ExpertRole(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, expert_ids: tuple[int, ...] | None = None, dtype=jnp.float32,
                 rngs: nnx.Rngs, kernels: str = "auto"):
        self.cfg = cfg
        self.kernels = _check_kernels(kernels)
        self.expert_ids = tuple(range(cfg.num_experts)) if expert_ids is None else tuple(expert_ids)
        init = _Init(dtype, rngs)
        n, e, h, f = cfg.num_layers, len(self.expert_ids), cfg.hidden_size, cfg.expert_ffn_size
        self.w_gate_up = init.normal(n, e, h, 2 * f)  # gate half first, then up
        self.w_down = init.normal(n, e, f, h)

    def __call__(self, layer: jax.Array, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """SwiGLU experts over rows x [rows, hidden] sorted by local expert, group_sizes [local experts]."""
        with jax.named_scope("experts"):
            wl = _weight_index(self.w_down, layer)
            if _native_cpu(self.kernels):
                # the stacked weights and the layer go to the custom call as they are: no layer slice copied,
                # only the experts with rows read (msjax.models.cpu_experts)
                return cpu_experts.grouped_ffn(x, group_sizes, self.w_gate_up[...], self.w_down[...], wl)
            return grouped_ffn(x, group_sizes, self.w_gate_up[wl], self.w_down[wl], **kernel_args(self.kernels))
