"""Decode attention over a paged KV cache with grouped-query heads.

Contract (the Mosaic GPU kernel here must match `paged_gqa_decode_reference`): one query token per sequence,
keys and values in fixed-size pages addressed through a page table.

Kernel layout (Hopper, `jax.experimental.pallas.mosaic_gpu`), flash-decoding in two steps:

1. `_decode_split_kernel`, grid (splits, kv_heads, batch), one warpgroup per block. A block owns one KV head
   of one sequence and one contiguous share of that sequence's KV blocks, and all `group` query heads that
   read that KV head, so every KV byte is read once. Per step it gathers `block_kv // page_size` pages of
   K and V with one TMA copy per page (page ids read as scalars from the page table in GMEM) into a ring
   of `num_stages` SMEM slots, computes scores with wgmma (the query group padded to the 64 rows wgmma
   needs), keeps an online softmax in float32 registers, writes P to SMEM in the KV dtype and accumulates
   P·V with wgmma. It writes its normalised partial output and log-sum-exp (base 2).
2. `_combine_splits`, plain jnp (XLA fuses it): the log-sum-exp merge of the splits.

The kernel is written for Mosaic GPU's default (warpgroup) lowering, whose layout inference also runs on a CPU:
`tests/test_paged_gqa_decode_kernel.py` lowers it for CUDA there and runs it under the Mosaic GPU interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.platform import is_hopper

_WGMMA_ROWS = 64  # a warpgroup's wgmma has M = 64: the query group is padded to it
_SMEM_LIMIT = 227 * 1024  # Hopper's shared memory per block
_SMEM_BUDGET = 200 * 1024  # what the default tiling fills, leaving room for barriers and alignment
_LOG2E = math.log2(math.e)


def paged_gqa_decode_reference(
    q: jax.Array,  # [batch, q_heads, head_dim]
    k_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    v_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: jax.Array,  # [batch, max_pages_per_seq] int32: page ids of each sequence, in order
    lengths: jax.Array,  # [batch] int32: valid tokens, the current one included
    *,
    scale: float,
) -> jax.Array:  # [batch, q_heads, head_dim], q's dtype
    """Softmax(q·kᵀ·scale)·v over the first `lengths[b]` cached tokens of each sequence, in float32.

    Query head h reads KV head h // (q_heads // kv_heads). Page-table entries past a sequence's length are
    never read for the result (they may hold any page id). A row with length 0 (batch padding) returns zeros.
    """
    batch, q_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
    group = q_heads // kv_heads
    context = page_table.shape[1] * page_size

    k = k_pages[page_table].reshape(batch, context, kv_heads, head_dim)  # [b, t, kvh, d]
    v = v_pages[page_table].reshape(batch, context, kv_heads, head_dim)
    qg = q.reshape(batch, kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("bhgd,bthd->bhgt", qg, k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale  # [b, kvh, g, t]
    valid = jnp.arange(context)[None, :] < lengths[:, None]  # [b, t]
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # empty rows: avoid inf - inf
    p = jnp.exp(scores - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgt,bthd->bhgd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(batch, q_heads, head_dim).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class DecodeTiling:
    """Static tiling of the kernel. `block_kv` tokens (whole pages) per pipeline step; `num_stages` SMEM slots
    of K and V in flight; each sequence's KV blocks are shared out over `num_splits` blocks of the grid."""

    block_kv: int
    num_stages: int
    num_splits: int


def _smem_bytes(block_kv: int, num_stages: int, head_dim: int, itemsize: int) -> int:
    q_tile = _WGMMA_ROWS * head_dim * itemsize
    p_tile = _WGMMA_ROWS * block_kv * itemsize
    out_tile = _WGMMA_ROWS * head_dim * 4 + _WGMMA_ROWS * 4
    return q_tile + p_tile + out_tile + num_stages * 2 * block_kv * head_dim * itemsize


def choose_tiling(
    batch: int,
    kv_heads: int,
    head_dim: int,
    page_size: int,
    max_pages_per_seq: int,
    itemsize: int = 2,
    *,
    block_kv: int | None = None,
    num_stages: int | None = None,
    num_splits: int | None = None,
    num_sms: int = 132,
) -> DecodeTiling:
    """Defaults for what the caller leaves as None: the smallest block of whole pages that is a multiple of
    64 tokens, as many SMEM stages (up to 4) as fit, and enough context splits for two blocks per SM."""
    if block_kv is None:
        block_kv = math.lcm(page_size, 64)
    if num_stages is None:
        num_stages = 4
        while num_stages > 1 and _smem_bytes(block_kv, num_stages, head_dim, itemsize) > _SMEM_BUDGET:
            num_stages -= 1
    max_blocks = pl.cdiv(max_pages_per_seq * page_size, block_kv)
    if num_splits is None:
        num_splits = pl.cdiv(2 * num_sms, batch * kv_heads)
    num_splits = max(1, min(num_splits, max_blocks))
    return DecodeTiling(block_kv=block_kv, num_stages=num_stages, num_splits=num_splits)


def _check_kernel_shapes(q, k_pages, v_pages, page_table, lengths, tiling: DecodeTiling) -> None:
    """Raise ValueError naming every constraint of the kernel that these inputs (or this tiling) break."""
    batch, q_heads, head_dim = q.shape
    _, page_size, kv_heads, kv_dim = k_pages.shape
    problems = []
    if v_pages.shape != k_pages.shape:
        problems.append(f"v_pages.shape={v_pages.shape} differs from k_pages.shape={k_pages.shape}")
    if kv_dim != head_dim:
        problems.append(f"k_pages head_dim {kv_dim} differs from q head_dim {head_dim}")
    if q_heads % kv_heads:
        problems.append(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
    elif q_heads // kv_heads > _WGMMA_ROWS:
        problems.append(f"group={q_heads // kv_heads} query heads per KV head exceeds {_WGMMA_ROWS}")
    if k_pages.dtype not in (jnp.bfloat16, jnp.float16) or v_pages.dtype != k_pages.dtype:
        problems.append(f"KV dtype {k_pages.dtype}/{v_pages.dtype}: the kernel takes bfloat16 or float16")
    if head_dim % 64 or head_dim > 256:
        problems.append(f"head_dim={head_dim} must be a multiple of 64, at most 256")
    if page_size % 8:
        problems.append(f"page_size={page_size} must be a multiple of 8 (SMEM tile rows)")
    if tiling.block_kv % page_size or tiling.block_kv % 64 or tiling.block_kv > 256:
        problems.append(f"block_kv={tiling.block_kv} must be whole pages of {page_size}, a multiple of 64, "
                        "at most 256")
    if tiling.num_stages < 1:
        problems.append(f"num_stages={tiling.num_stages} must be at least 1")
    if (smem := _smem_bytes(tiling.block_kv, tiling.num_stages, head_dim, k_pages.dtype.itemsize)) > _SMEM_LIMIT:
        problems.append(f"block_kv={tiling.block_kv}, num_stages={tiling.num_stages} need {smem} B of SMEM, "
                        f"more than Hopper's {_SMEM_LIMIT}")
    if page_table.ndim != 2 or page_table.shape[0] != batch or lengths.shape != (batch,):
        problems.append(f"page_table {page_table.shape} / lengths {lengths.shape} do not match batch={batch}")
    if problems:
        raise ValueError("paged_gqa_decode kernel: " + "; ".join(problems))


def _decode_split_kernel(
    q_ref,  # GMEM [batch * kv_heads * group_rows + pad, head_dim]: group (b, h) from row (b·kv_heads + h)·group_rows
    k_ref,  # GMEM [num_pages, page_size, kv_heads, head_dim]
    v_ref,  # GMEM [num_pages, page_size, kv_heads, head_dim]
    page_table_ref,  # GMEM [batch, max_pages_per_seq] int32
    lengths_ref,  # GMEM [batch] int32
    o_ref,  # GMEM [batch, kv_heads, splits, group, head_dim] f32: normalised partial outputs
    lse_ref,  # GMEM [batch, kv_heads, splits, group_padded] f32: log2-sum-exp2 of each split's scores
    q_smem,  # SMEM [64, head_dim], tiled + swizzled for wgmma
    k_smem,  # SMEM [num_stages, block_kv, head_dim], tiled + swizzled
    v_smem,  # SMEM [num_stages, block_kv, head_dim], tiled + swizzled
    p_smem,  # SMEM [64, block_kv], tiled + swizzled: softmax weights in the KV dtype
    o_smem,  # SMEM [64, head_dim] f32
    lse_smem,  # SMEM [64] f32
    q_barrier,
    k_barriers,  # [num_stages], one arrival per page copy
    v_barriers,  # [num_stages], one arrival per page copy
    *,
    scale: float,
    group: int,
    group_rows: int,
    group_padded: int,
    tiling: DecodeTiling,
):
    block_kv, num_stages, num_splits = tiling.block_kv, tiling.num_stages, tiling.num_splits
    max_pages_per_seq = page_table_ref.shape[1]
    page_size, kv_heads = k_ref.shape[1], k_ref.shape[2]
    pages_per_block = block_kv // page_size
    head_dim = q_smem.shape[-1]
    split, kv_head, b = lax.axis_index("split"), lax.axis_index("kv_head"), lax.axis_index("batch")

    # Lengths past the page table's reach read as the whole table, as in the reference.
    length = jnp.clip(lengths_ref[b], 0, max_pages_per_seq * page_size)
    num_blocks = lax.div(length + (block_kv - 1), jnp.int32(block_kv))
    blocks_per_split = lax.div(num_blocks + (num_splits - 1), jnp.int32(num_splits))
    first_block = split * blocks_per_split
    num_steps = jnp.maximum(jnp.minimum(first_block + blocks_per_split, num_blocks) - first_block, 0)
    # Pages past the last valid one are never fetched: the tail of a step re-reads the last valid page (an L2
    # hit) so that SMEM never holds uninitialised data, whose NaNs would survive a zero softmax weight in P·V.
    last_page = jnp.maximum(lax.div(length + (page_size - 1), jnp.int32(page_size)) - 1, 0)

    def fetch(step, slot):
        first_page = (first_block + step) * pages_per_block
        for j in range(pages_per_block):
            page = page_table_ref[b, jnp.minimum(first_page + j, last_page)]
            rows = pl.ds(j * page_size, page_size)
            plgpu.copy_gmem_to_smem(k_ref.at[page, :, kv_head], k_smem.at[slot, rows], k_barriers.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[page, :, kv_head], v_smem.at[slot, rows], v_barriers.at[slot])

    q_row = (b * kv_heads + kv_head) * group_rows
    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_row, _WGMMA_ROWS)], q_smem, q_barrier)
    for i in range(num_stages):
        pl.when(i < num_steps)(functools.partial(fetch, i, i))
    plgpu.barrier_wait(q_barrier)

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    m_i = plgpu.layout_cast(jnp.full((_WGMMA_ROWS,), -jnp.inf, jnp.float32), row_layout)  # running max, log2
    l_i = plgpu.layout_cast(jnp.full((_WGMMA_ROWS,), 0.0, jnp.float32), row_layout)
    acc = plgpu.layout_cast(jnp.full((_WGMMA_ROWS, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

    def step_body(step, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(step, jnp.int32(num_stages))
        plgpu.barrier_wait(k_barriers.at[slot])

        def qk_scope(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            return acc_ref[...]

        s = pl.run_scoped(qk_scope, plgpu.ACC((_WGMMA_ROWS, block_kv), jnp.float32))  # [64, block_kv]
        # Scores in base 2 (scale·log2 e folded in once) so that exp2 is a single FMA + MUFU op.
        s = s * (scale * _LOG2E)
        token = plgpu.broadcasted_iota(jnp.int32, (_WGMMA_ROWS, block_kv), 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(token + (first_block + step) * block_kv < length, s, -jnp.inf)
        # Every step holds at least one valid token, so m_new is finite from the first step on.
        m_new = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        # P goes through SMEM as wgmma's A operand: the Mosaic GPU interpreter takes only SMEM operands, and
        # the 64 x block_kv bf16 tile is small next to the KV bytes this step streams.
        p_smem[...] = p.astype(p_smem.dtype)
        plgpu.commit_smem()
        plgpu.barrier_wait(v_barriers.at[slot])

        def pv_scope(acc_ref):
            plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
            return acc_ref[...]

        acc = acc + pl.run_scoped(pv_scope, plgpu.ACC((_WGMMA_ROWS, head_dim), jnp.float32))
        # Both wgmmas that read this slot are complete: refill it with the step num_stages ahead.
        pl.when(step + num_stages < num_steps)(functools.partial(fetch, step + num_stages, slot))
        return acc, m_new, l_i

    acc, m_i, l_i = lax.fori_loop(0, num_steps, step_body, (acc, m_i, l_i))

    # An empty split (num_steps == 0) leaves l_i = 0: it writes zeros and lse = -inf, weight 0 in the merge.
    has_mass = l_i > 0
    inv_l = jnp.where(has_mass, 1.0 / jnp.where(has_mass, l_i, 1.0), 0.0)
    o_smem[...] = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
    lse_smem[...] = jnp.where(has_mass, m_i + jnp.log(jnp.where(has_mass, l_i, 1.0)) * _LOG2E, -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, group)], o_ref.at[b, kv_head, split])
    plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, group_padded)], lse_ref.at[b, kv_head, split])
    plgpu.wait_smem_to_gmem(0)


def _combine_splits(
    o_split: jax.Array,  # [batch, kv_heads, splits, group, head_dim] f32, each split normalised
    lse_split: jax.Array,  # [batch, kv_heads, splits, group] f32, base 2; -inf for an empty split
) -> jax.Array:  # [batch, kv_heads, group, head_dim] f32
    """Log-sum-exp merge: each split weighs in by its share of the softmax mass; all-empty rows give zeros."""
    if o_split.shape[2] == 1:  # one split: already normalised, zeros where empty
        return o_split[:, :, 0]
    top = jnp.max(lse_split, axis=2, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weight = jnp.exp2(lse_split - top)[..., None]  # [b, kvh, s, g, 1]
    total = jnp.sum(weight, axis=2)  # [b, kvh, g, 1]
    return jnp.sum(weight * o_split, axis=2) / jnp.where(total > 0, total, 1.0)


def paged_gqa_decode_kernel(
    q: jax.Array,  # [batch, q_heads, head_dim]
    k_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim] bf16 / f16
    v_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: jax.Array,  # [batch, max_pages_per_seq] int32
    lengths: jax.Array,  # [batch] int32
    *,
    scale: float,
    tiling: DecodeTiling,
    interpret=False,
) -> jax.Array:  # [batch, q_heads, head_dim], q's dtype
    """The Mosaic GPU kernel plus the split merge, unjitted (see `paged_gqa_decode` for the public entry).

    q is cast to the KV dtype for wgmma; scores, softmax and accumulation are float32.
    """
    _check_kernel_shapes(q, k_pages, v_pages, page_table, lengths, tiling)
    batch, q_heads, head_dim = q.shape
    kv_heads = k_pages.shape[2]
    group = q_heads // kv_heads
    group_padded = -(-group // 4) * 4  # a TMA row is a multiple of 16 bytes
    splits = tiling.num_splits
    dtype = k_pages.dtype

    # Each block reads a 64-row window of q from its group's first row; rows past the group belong to other
    # heads (or the zero pad) and only fill wgmma's M: their results are dropped. Groups start on whole
    # 8-row tiles because a TMA into a tiled SMEM buffer addresses GMEM in whole tiles.
    group_rows = -(-group // 8) * 8
    q_rows = jnp.pad(q.reshape(batch, kv_heads, group, head_dim).astype(dtype),
                     ((0, 0), (0, 0), (0, group_rows - group), (0, 0)))
    q_rows = jnp.pad(q_rows.reshape(batch * kv_heads * group_rows, head_dim),
                     ((0, _WGMMA_ROWS - group_rows), (0, 0)))  # [batch * kv_heads * group_rows + pad, head_dim]

    swizzle = 128
    transforms = (plgpu.TilingTransform((8, swizzle // dtype.itemsize)), plgpu.SwizzleTransform(swizzle))
    scratch = dict(
        q_smem=plgpu.SMEM((_WGMMA_ROWS, head_dim), dtype, transforms=transforms),
        k_smem=plgpu.SMEM((tiling.num_stages, tiling.block_kv, head_dim), dtype, transforms=transforms),
        v_smem=plgpu.SMEM((tiling.num_stages, tiling.block_kv, head_dim), dtype, transforms=transforms),
        p_smem=plgpu.SMEM((_WGMMA_ROWS, tiling.block_kv), dtype, transforms=transforms),
        o_smem=plgpu.SMEM((_WGMMA_ROWS, head_dim), jnp.float32),
        lse_smem=plgpu.SMEM((_WGMMA_ROWS,), jnp.float32),
        q_barrier=plgpu.Barrier(),
        k_barriers=plgpu.Barrier(num_arrivals=tiling.block_kv // k_pages.shape[1], num_barriers=tiling.num_stages),
        v_barriers=plgpu.Barrier(num_arrivals=tiling.block_kv // k_pages.shape[1], num_barriers=tiling.num_stages),
    )
    body = functools.partial(_decode_split_kernel, scale=float(scale), group=group, group_rows=group_rows,
                             group_padded=group_padded, tiling=tiling)
    o_split, lse_split = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((batch, kv_heads, splits, group, head_dim), jnp.float32),
                  jax.ShapeDtypeStruct((batch, kv_heads, splits, group_padded), jnp.float32)),
        scratch_types=scratch,
        grid=(splits, kv_heads, batch),
        grid_names=("split", "kv_head", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q_rows, k_pages, v_pages, page_table.astype(jnp.int32), lengths.astype(jnp.int32))
    out = _combine_splits(o_split, lse_split[..., :group])
    return out.reshape(batch, q_heads, head_dim).astype(q.dtype)



@functools.partial(jax.jit, static_argnames=("scale", "impl", "interpret", "block_kv", "num_stages", "num_splits"))
def paged_gqa_decode(
    q: jax.Array,  # [batch, q_heads, head_dim]
    k_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    v_pages: jax.Array,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: jax.Array,  # [batch, max_pages_per_seq] int32
    lengths: jax.Array,  # [batch] int32
    *,
    scale: float,
    impl: str = "auto",
    interpret=False,
    block_kv: int | None = None,
    num_stages: int | None = None,
    num_splits: int | None = None,
) -> jax.Array:  # [batch, q_heads, head_dim], q's dtype
    """Paged GQA decode attention; same contract as `paged_gqa_decode_reference`.

    impl: "kernel" (the Mosaic GPU kernel; needs a Hopper GPU unless `interpret`), "reference" (plain jnp),
    or "auto": the kernel on a Hopper GPU, or anywhere when `interpret` is set, for inputs it supports;
    the reference otherwise. interpret: False, True, or a `plgpu.InterpretGPUParams` (runs the kernel on CPU
    under the Mosaic GPU interpreter). block_kv / num_stages / num_splits: tiling, None for the defaults of
    `choose_tiling`. scale is static (one compile per distinct value).
    """
    if impl not in ("auto", "kernel", "reference"):
        raise ValueError(f"impl={impl!r}: expected 'auto', 'kernel' or 'reference'")
    if impl == "reference":
        return paged_gqa_decode_reference(q, k_pages, v_pages, page_table, lengths, scale=scale)
    batch, _, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    num_sms = getattr(jax.devices()[0], "core_count", None) or 132  # H100 SXM when the device does not say
    tiling = choose_tiling(batch, kv_heads, head_dim, page_size, page_table.shape[1], k_pages.dtype.itemsize,
                           block_kv=block_kv, num_stages=num_stages, num_splits=num_splits, num_sms=num_sms)
    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    if impl == "auto":
        try:
            _check_kernel_shapes(q, k_pages, v_pages, page_table, lengths, tiling)
        except ValueError:
            supported = False
        else:
            supported = bool(interpret) or is_hopper()
        if not supported:
            return paged_gqa_decode_reference(q, k_pages, v_pages, page_table, lengths, scale=scale)
    return paged_gqa_decode_kernel(q, k_pages, v_pages, page_table, lengths, scale=scale, tiling=tiling,
                                   interpret=interpret or None)
