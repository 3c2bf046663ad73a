"""Grouped GEMM over tokens sorted by expert, and the SwiGLU expert FFN built on it.

Contract (the Mosaic GPU kernel that the kernel issue adds here must match the references): rows of `x` are
sorted by group; `group_sizes[g]` rows belong to group g, in order; groups may be empty; the sizes may sum to
less than the number of rows, and the tail rows are padding whose output is zero.

`grouped_gemm` and `grouped_ffn` are the jitted public API: the Hopper kernel below (`_grouped_matmul_kernel`)
on a Hopper GPU or in the Mosaic GPU interpreter, the references elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.platform import is_hopper


def _tail_mask(rows: int, group_sizes: jax.Array) -> jax.Array:  # [rows, 1] bool
    return (jnp.arange(rows) < jnp.sum(group_sizes))[:, None]


def grouped_gemm_reference(
    x: jax.Array,  # [tokens, k], sorted by group
    w: jax.Array,  # [groups, k, n]
    group_sizes: jax.Array,  # [groups] int32
    *,
    preferred_element_type=None,
) -> jax.Array:  # [tokens, n]
    """Row i of the result is x[i] @ w[g(i)], accumulated in float32; padding rows are zero.

    The result has x's dtype unless `preferred_element_type` says otherwise.
    """
    out_dtype = preferred_element_type or x.dtype
    out = jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST)
    return jnp.where(_tail_mask(x.shape[0], group_sizes), out, 0).astype(out_dtype)


def grouped_gemm_dense(
    x: jax.Array,  # [tokens, k], sorted by group
    w: jax.Array,  # [groups, k, n]
    group_sizes: jax.Array,  # [groups] int32
    *,
    preferred_element_type=None,
) -> jax.Array:  # [tokens, n]
    """`grouped_gemm_reference` as one dense matmul, the form used on CPU: row i of x placed in its group's
    block of a [tokens, groups * k] matrix (zeros elsewhere, and everywhere for padding rows) times w viewed as
    [groups * k, n], a free reshape of its row-major layout. XLA:CPU expands `ragged_dot` into the same
    contraction but over w transposed to [k, groups, n]: a copy of the weights on every call, and in a program
    over every layer (the expert node's step) XLA made all of those copies at the start, holding every layer's
    expert weights twice."""
    out_dtype = preferred_element_type or x.dtype
    rows, k = x.shape
    groups, _, n = w.shape
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))  # [groups]
    group = jnp.sum(jnp.arange(rows)[:, None] >= ends[None, :], axis=1)  # [rows]: groups for padding rows
    onehot = group[:, None] == jnp.arange(groups)[None, :]  # [rows, groups]
    placed = jnp.where(onehot[:, :, None], x[:, None, :], 0).reshape(rows, groups * k)
    out = jnp.dot(placed, w.reshape(groups * k, n), precision=jax.lax.Precision.HIGHEST,
                  preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def grouped_ffn_reference(
    x: jax.Array,  # [tokens, hidden], sorted by expert
    group_sizes: jax.Array,  # [experts] int32
    w_gate_up: jax.Array,  # [experts, hidden, 2 * ffn]: gate half first, then up
    w_down: jax.Array,  # [experts, ffn, hidden]
    *,
    gemm=grouped_gemm_reference,
) -> jax.Array:  # [tokens, hidden]
    """SwiGLU expert FFN: down(silu(x @ gate) * (x @ up)) per expert; padding rows are zero. `gemm`: the
    grouped matmul to build it from (`grouped_gemm_dense` gives the same numbers, without copies on CPU)."""
    gate_up = gemm(x, w_gate_up, group_sizes, preferred_element_type=jnp.float32)
    gate, up = jnp.split(gate_up, 2, axis=-1)  # [tokens, ffn] each
    act = (jax.nn.silu(gate) * up).astype(x.dtype)
    return gemm(act, w_down, group_sizes)


def _fallback_gemm():
    """The grouped matmul where the kernel does not run: the dense form on CPU (see `grouped_gemm_dense`),
    `ragged_dot` elsewhere (not measured there: on a Hopper GPU the kernel is the path that counts)."""
    return grouped_gemm_dense if jax.default_backend() == "cpu" else grouped_gemm_reference


# ---------------------------------------------------------------------------------------------------------------
# The Mosaic GPU kernel (Hopper: TMA loads, wgmma, a persistent grid, warp specialization).
#
# Work is a list of row tiles times column blocks. A row tile belongs to ONE group: its x window of block_m rows
# starts at the group's first row rounded down to a multiple of 8 (the SMEM tiling that TMA and wgmma need), not
# at a multiple of block_m, so a group's weights are streamed cdiv(size + start % 8, block_m) times, and not once
# more for every block_m boundary that it happens to straddle. The rows past the groups form one more part, whose
# tiles store zeros without a main loop. The list is built in plain XLA before the kernel (`_tile_schedule`), so
# the kernel reads four scalars per tile however many experts there are, and its persistent loop runs over
# exactly the tiles that exist.
# ---------------------------------------------------------------------------------------------------------------

_SMEM_BYTES = 227 * 1024  # usable shared memory per SM on H100 / H200
_COMPUTE_WGS = 2  # compute warpgroups per CTA; each owns block_n of the CTA's 2 * block_n output columns


@dataclasses.dataclass(frozen=True)
class GemmTiling:
    """Tile sizes of the kernel. A CTA computes a [block_m, 2 * block_n] output tile: two compute warpgroups
    of [block_m, block_n] each, fed by one TMA warpgroup through `max_concurrent_steps` SMEM stages."""

    block_m: int = 128  # rows of one group per tile (64 suits decode, where groups are small)
    block_n: int = 128  # output columns per compute warpgroup
    block_k: int = 64  # contraction per pipeline step; 64 bf16 = one 128-byte swizzle row
    max_concurrent_steps: int = 4  # SMEM pipeline stages
    epilogue_n: int = 64  # columns per TMA store of the epilogue; rows of 128 bytes keep every row start aligned
    grid_tile_width: int = 4  # column blocks walked together before moving to the next row tile (L2 reuse)
    num_sms: int | None = None  # persistent CTAs; None: the device's SM count (132 on H100 SXM), 4 interpreted

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "max_concurrent_steps", "epilogue_n", "grid_tile_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"GemmTiling.{name} must be positive, got {getattr(self, name)}")
        if self.block_m % 64:
            raise ValueError(f"GemmTiling.block_m must be a multiple of 64 (one wgmma M), got {self.block_m}")
        if self.block_n % self.epilogue_n:
            raise ValueError(f"GemmTiling.block_n={self.block_n} must be a multiple of epilogue_n={self.epilogue_n}")
        if self.max_concurrent_steps < 2:
            raise ValueError("GemmTiling.max_concurrent_steps must be at least 2 (wgmma overlaps one step)")

    def smem_bytes(self, itemsize: int, num_rhs: int) -> int:
        stage = self.block_m * self.block_k + num_rhs * self.block_k * _COMPUTE_WGS * self.block_n
        out = _COMPUTE_WGS * self.block_m * self.epilogue_n
        return (self.max_concurrent_steps * stage + out) * itemsize


_ROW_ALIGN = 8  # x windows start on multiples of the 8-row tiling of the swizzled SMEM layout that wgmma reads


def _tile_schedule(group_sizes: jax.Array, rows: int, block_m: int) -> jax.Array:  # [5, max_tiles] int32
    """The kernel's row tiles, one column each: [0] group (-1: the padding rows, stored as zeros), [1] the first
    row of the tile's x window (a multiple of 8), [2] the first of its rows that the tile owns, relative to [1],
    [3] how many rows it owns (1..block_m), [4] the number of tiles (in every column).

    A group's tiles start at its first row rounded down to a multiple of 8 and advance by block_m; rows of the
    window outside the group are computed with the wrong weights and not stored. Entries past the number of
    tiles are never read."""
    num_groups = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), rows)  # clamp a sum > rows
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    part_starts = jnp.concatenate([starts, ends[-1:]])  # [groups + 1]: the groups, then the padding rows
    part_ends = jnp.concatenate([ends, jnp.full((1,), rows, jnp.int32)])
    window_starts = part_starts - part_starts % _ROW_ALIGN
    part_tiles = jnp.where(part_ends > part_starts, (part_ends - window_starts + block_m - 1) // block_m, 0)
    tile_ends = jnp.cumsum(part_tiles)  # [groups + 1], inclusive
    # Per part, cdiv(size + 7, block_m) <= size / block_m + 2 (block_m >= 64).
    max_tiles = pl.cdiv(rows, block_m) + 2 * (num_groups + 1)
    tile = jnp.arange(max_tiles, dtype=jnp.int32)
    part = jnp.minimum(jnp.sum(tile_ends[None, :] <= tile[:, None], axis=1, dtype=jnp.int32), num_groups)
    window = window_starts[part] + (tile - (tile_ends[part] - part_tiles[part])) * block_m
    first = jnp.maximum(part_starts[part], window)
    count = jnp.clip(jnp.minimum(part_ends[part], window + block_m) - first, 0, block_m)
    group = jnp.where(part < num_groups, part, -1)
    num_tiles = jnp.broadcast_to(tile_ends[-1], (max_tiles,))
    return jnp.stack([group, window, first - window, count, num_tiles]).astype(jnp.int32)


def _store_rows(src_smem, dst_gmem, offset, count, max_rows: int):
    """TMA-stores rows [offset, offset + count) of `src_smem` [max_rows, cols] to the same rows of `dst_gmem`
    [max_rows, cols], with offset + count <= max_rows known only at run time.

    TMA boxes have static shapes, so the count is stored as its binary expansion: one copy of 2**i rows per set
    bit, largest first (JAX's ragged_dot_mgpu does the same). A full tile is one copy. Rows outside belong to
    another group, or do not exist, and must not be written. The source is untiled SMEM because the copies
    start at arbitrary rows."""
    size = 1 << (max_rows.bit_length() - 1)
    while size:
        @pl.when((count & size) != 0)
        def _(offset=offset, size=size):
            plgpu.copy_smem_to_gmem(src_smem.at[pl.ds(offset, size)], dst_gmem.at[pl.ds(offset, size)])
        offset = offset + (count & size)
        size //= 2


def _grouped_matmul_kernel(schedule_gmem, x_gmem, w_gmem, out_gmem, *, tiling: GemmTiling, swiglu: bool):
    """out[rows of group g] = x[rows] @ w[g] (or, with `swiglu`, silu(x @ gate[g]) * (x @ up[g]) with gate and
    up the two halves of w's columns); padding rows are zero.

    schedule_gmem: [5, max_tiles] int32 (`_tile_schedule`); x_gmem: [rows, k]; w_gmem: [groups, k, n_w];
    out_gmem: [rows, n_out], n_out = n_w (plain) or n_w / 2 (swiglu)."""
    block_m, block_n, block_k = tiling.block_m, tiling.block_n, tiling.block_k
    epilogue_n = tiling.epilogue_n
    cta_n = _COMPUTE_WGS * block_n
    k = x_gmem.shape[1]
    n_out = out_gmem.shape[1]
    num_rhs = 2 if swiglu else 1
    grid_n = n_out // cta_n
    swizzle = plgpu.find_swizzle(block_k * jnp.dtype(x_gmem.dtype).itemsize * 8)
    swizzle_elems = swizzle // jnp.dtype(x_gmem.dtype).itemsize
    transforms = (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle))
    # delay_release=1: a stage is handed back to the TMA warpgroup one step after its wgmma was issued, so the
    # tensor cores always have the next step's wgmma queued behind the running one.
    x_spec = plgpu.BlockSpec((block_m, block_k), lambda ki: (0, ki), transforms=transforms, delay_release=1)
    w_spec = plgpu.BlockSpec((block_k, cta_n), lambda ki: (ki, 0), transforms=transforms, delay_release=1)

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k // block_k,), memory_registers=40, in_specs=[x_spec] + [w_spec] * num_rhs,
            wg_axis="wg", num_compute_wgs=_COMPUTE_WGS, max_concurrent_steps=tiling.max_concurrent_steps,
            compute_context=compute_context)

    def operands(group, window, col_block):  # GMEM windows of one work item
        if not isinstance(window, int):  # the TMA into tiled SMEM needs the row start known to be aligned
            window = pl.multiple_of(window, _ROW_ALIGN)
        x_rows = x_gmem.at[pl.ds(window, block_m)]  # [block_m, k]; TMA zero-fills rows past the end
        cols = [pl.ds(half * n_out + col_block * cta_n, cta_n) for half in range(num_rhs)]
        return (x_rows, *(w_gmem.at[group, :, c] for c in cols))  # w windows: [k, cta_n] each

    ignore = lambda *_, **__: None  # the allocations do not depend on the body

    @functools.partial(
        pl.run_scoped,
        stages=pipeline(ignore, ignore).get_allocations(*operands(0, 0, 0)),
        out_smem=plgpu.SMEM((_COMPUTE_WGS, block_m, epilogue_n), out_gmem.dtype),  # untiled: see _store_rows
        collective_axes="wg",
    )
    def _scope(stages, out_smem):
        wg = lax.axis_index("wg")
        num_tiles = schedule_gmem[4, 0]

        @plgpu.nd_loop((num_tiles * grid_n,), collective_axes="sm")
        def _work(loop_info: plgpu.NDLoopInfo):
            tile, col_block = plgpu.planar_snake(loop_info.index[0], (num_tiles, grid_n), 1, tiling.grid_tile_width)
            group, window = schedule_gmem[0, tile], schedule_gmem[1, tile]
            offset, count = schedule_gmem[2, tile], schedule_gmem[3, tile]
            wg_cols = col_block * cta_n + wg * block_n

            def store(result):  # result: [block_m, block_n] in out dtype; a compute warpgroup's tile
                for e in range(block_n // epilogue_n):
                    # The previous tile's stores read this buffer; they had a whole main loop to finish.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem[wg] = result[:, e * epilogue_n:(e + 1) * epilogue_n]
                    plgpu.commit_smem()
                    out_window = out_gmem.at[pl.ds(window, block_m), pl.ds(wg_cols + e * epilogue_n, epilogue_n)]
                    _store_rows(out_smem.at[wg], out_window, offset, count, block_m)

            def mma(_, x_smem, *rest):
                *w_smems, accs = rest
                for acc, w_smem in zip(accs, w_smems):
                    plgpu.wgmma(acc, x_smem, w_smem.at[:, pl.ds(wg * block_n, block_n)])
                # Leave this step's wgmmas in flight; the previous step's are done, so its stage can go back.
                plgpu.wgmma_wait(num_rhs)
                return accs

            def compute_context(run_pipeline):
                def acc_scope(*accs):
                    run_pipeline(accs)
                    if swiglu:
                        gate, up = accs[0][...], accs[1][...]  # f32, as the reference keeps them
                        result = jax.nn.silu(gate) * up
                    else:
                        result = accs[0][...]
                    store(result.astype(out_gmem.dtype))

                pl.run_scoped(acc_scope, *[plgpu.ACC((block_m, block_n), jnp.float32)] * num_rhs)

            @pl.when(group >= 0)
            def _matmul_tile():
                pipeline(mma, compute_context)(*operands(group, window, col_block), allocations=stages)

            @pl.when((group < 0) & (wg < _COMPUTE_WGS))
            def _padding_tile():
                store(jnp.zeros((block_m, block_n), out_gmem.dtype))

        @pl.when(wg < _COMPUTE_WGS)
        def _drain():
            plgpu.wait_smem_to_gmem(0)


def _padded_rows(rows: int, block_m: int) -> int:
    """Rows of the x that the kernel takes: the TMA into 8-row-tiled SMEM needs a multiple of 8 in GMEM too
    (the interpreter does not check this; the lowering does), and a tile's window must fit."""
    return max(-(-rows // _ROW_ALIGN) * _ROW_ALIGN, block_m)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _grouped_matmul(x, w, group_sizes, *, swiglu: bool, tiling: GemmTiling,
                    interpret: bool | plgpu.InterpretGPUParams, rows: int | None = None) -> jax.Array:
    """The kernel on x [padded rows, k] whose first `rows` rows (default: all) are the tokens; returns
    [padded rows, n_out] with the rows past `rows` unspecified. Pads x itself when its rows do not fit."""
    rows = x.shape[0] if rows is None else rows
    x = _pad_rows(x, max(x.shape[0], _padded_rows(rows, tiling.block_m)))
    padded_rows, k = x.shape
    num_groups, k_w, n_w = w.shape
    n_out = n_w // 2 if swiglu else n_w
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"the kernel takes bf16 or f16 x and w of one dtype, got {x.dtype} and {w.dtype}")
    if k != k_w or group_sizes.shape != (num_groups,):
        raise ValueError(f"shapes do not fit: x {x.shape}, w {w.shape}, group_sizes {group_sizes.shape}")
    cta_n = _COMPUTE_WGS * tiling.block_n
    if k % tiling.block_k or k // tiling.block_k < 2 or n_out % cta_n or (swiglu and n_w % 2):
        raise ValueError(f"k={k} must be a multiple of block_k={tiling.block_k} (at least two of them) and the "
                         f"output width {n_out} a multiple of 2 * block_n={cta_n}")
    swizzle_elems = plgpu.find_swizzle(tiling.block_k * x.dtype.itemsize * 8) // x.dtype.itemsize
    if tiling.block_n % swizzle_elems:
        raise ValueError(f"block_n={tiling.block_n} must be a multiple of the {swizzle_elems}-column swizzle")
    if tiling.epilogue_n * x.dtype.itemsize % 128:  # TMA wants 128-byte aligned SMEM; stores start at any row
        raise ValueError(f"epilogue_n={tiling.epilogue_n} must span a multiple of 128 bytes")
    if (smem := tiling.smem_bytes(x.dtype.itemsize, 2 if swiglu else 1)) > _SMEM_BYTES:
        raise ValueError(f"{tiling} needs {smem} bytes of shared memory, more than {_SMEM_BYTES}")
    schedule = _tile_schedule(group_sizes, rows, tiling.block_m)
    num_sms = tiling.num_sms or (4 if interpret else jax.devices()[0].core_count)
    kernel = plgpu.kernel(
        functools.partial(_grouped_matmul_kernel, tiling=tiling, swiglu=swiglu),
        out_type=jax.ShapeDtypeStruct((padded_rows, n_out), x.dtype),
        grid=(num_sms,), grid_names=("sm",), num_threads=_COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                   else plgpu.InterpretGPUParams() if interpret else None),
    )
    return kernel(schedule, x, w)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------

Impl = Literal["auto", "kernel", "reference"]


def default_tiling(rows: int, num_groups: int, k: int, n_out: int, *, num_rhs: int = 1,
                   itemsize: int = 2) -> GemmTiling | None:
    """A tiling that fits the shapes, or None. 64-row tiles only when groups average at most 48 rows (a group
    whose window, rounded down to 8 rows, spills into a second tile streams its weights twice); the widest
    columns that divide the output; as many pipeline stages (up to 6) as shared memory holds. Untuned: the
    first GPU session should sweep around it (bench/kernels_gemm.py)."""
    block_m = 64 if rows <= 48 * num_groups else 128
    for block_k in (64, 32, 16):
        if k % block_k or k // block_k < 2:  # the pipeline keeps one step's wgmma in flight
            continue
        swizzle_elems = plgpu.find_swizzle(block_k * itemsize * 8) // itemsize
        epilogue_n = 128 // itemsize
        for block_n in (128 // num_rhs, 64):
            if block_n % swizzle_elems or block_n % epilogue_n or n_out % (_COMPUTE_WGS * block_n):
                continue
            for steps in range(6, 1, -1):
                tiling = GemmTiling(block_m=block_m, block_n=block_n, block_k=block_k, max_concurrent_steps=steps,
                                    epilogue_n=epilogue_n)
                if tiling.smem_bytes(itemsize, num_rhs) <= _SMEM_BYTES:
                    return tiling
    return None



def _pick_kernel(impl: Impl, interpret: bool, dtype, tiling: GemmTiling | None) -> bool:
    """Whether to run the kernel: "auto" takes it on a Hopper GPU (or when interpreted) for shapes and dtypes
    it supports, "kernel" insists (and raises where it cannot run), "reference" never takes it."""
    if impl == "reference":
        return False
    if impl == "kernel":
        if not interpret and not is_hopper():
            raise ValueError("impl='kernel' needs a Hopper GPU (wgmma, TMA); pass interpret=True on other hosts")
        return True
    if impl == "auto":
        return (interpret or is_hopper()) and dtype in (jnp.bfloat16, jnp.float16) and tiling is not None
    raise ValueError(f"impl must be 'auto', 'kernel' or 'reference', got {impl!r}")


@functools.partial(jax.jit, static_argnames=("impl", "interpret", "tiling"))
def grouped_gemm(
    x: jax.Array,  # [tokens, k], sorted by group
    w: jax.Array,  # [groups, k, n]
    group_sizes: jax.Array,  # [groups] int32
    *,
    impl: Impl = "auto",
    interpret: bool = False,
    tiling: GemmTiling | None = None,
) -> jax.Array:  # [tokens, n], x's dtype
    """`grouped_gemm_reference` by the Mosaic GPU kernel (see `_pick_kernel` for `impl`). `interpret=True` runs
    the kernel in the Mosaic GPU interpreter on any host; `tiling` defaults to `default_tiling`."""
    tiling = tiling or default_tiling(x.shape[0], w.shape[0], x.shape[1], w.shape[2], itemsize=x.dtype.itemsize)
    if not _pick_kernel(impl, interpret, x.dtype, tiling):
        return _fallback_gemm()(x, w, group_sizes)
    if tiling is None:
        raise ValueError(f"no kernel tiling fits x {x.shape} @ w {w.shape}; pass one")
    return _grouped_matmul(x, w, group_sizes, swiglu=False, tiling=tiling, interpret=interpret)[:x.shape[0]]


@functools.partial(jax.jit, static_argnames=("impl", "interpret", "tiling"))
def grouped_ffn(
    x: jax.Array,  # [tokens, hidden], sorted by expert
    group_sizes: jax.Array,  # [experts] int32
    w_gate_up: jax.Array,  # [experts, hidden, 2 * ffn]: gate half first, then up
    w_down: jax.Array,  # [experts, ffn, hidden]
    *,
    impl: Impl = "auto",
    interpret: bool = False,
    tiling: tuple[GemmTiling, GemmTiling] | None = None,
) -> jax.Array:  # [tokens, hidden]
    """`grouped_ffn_reference` by two kernel launches: gate and up in one main loop (two accumulators per
    warpgroup) with SwiGLU in its epilogue, writing only the [tokens, ffn] activation in x's dtype; then the down
    projection. `tiling` is (gate-up tiling, down tiling), each defaulting to `default_tiling`."""
    rows, hidden = x.shape
    num_experts, _, ffn2 = w_gate_up.shape
    up_tiling, down_tiling = tiling or (
        default_tiling(rows, num_experts, hidden, ffn2 // 2, num_rhs=2, itemsize=x.dtype.itemsize),
        default_tiling(rows, num_experts, ffn2 // 2, hidden, itemsize=x.dtype.itemsize))
    fits = None if up_tiling is None or down_tiling is None else up_tiling
    if not _pick_kernel(impl, interpret, x.dtype, fits):
        return grouped_ffn_reference(x, group_sizes, w_gate_up, w_down, gemm=_fallback_gemm())
    if fits is None:
        raise ValueError(f"no kernel tiling fits the FFN of x {x.shape}, w_gate_up {w_gate_up.shape}; pass one")
    # Pad once for both launches. The activation keeps the padded rows: those past `rows` are unspecified, and
    # the down projection computes them in its windows but never stores them.
    x = _pad_rows(x, _padded_rows(rows, max(up_tiling.block_m, down_tiling.block_m)))
    act = _grouped_matmul(x, w_gate_up, group_sizes, swiglu=True, tiling=up_tiling, interpret=interpret, rows=rows)
    out = _grouped_matmul(act, w_down, group_sizes, swiglu=False, tiling=down_tiling, interpret=interpret, rows=rows)
    return out[:rows]
