"""Causal sliding-window attention with ALiBi as Mosaic GPU (Hopper) kernels.

Same semantics, arguments and plain-JAX references as kernels_pallas/sliding_window.py (the Triton
kernels): query position i attends key positions j with i - window <= j <= i, logits scaled by
`scale` and biased by -slope_h * (i - j). Shapes: q [batch, length, heads, head_dim], k/v
[batch, length, kv_heads, head_dim] (grouped-query attention).

Every kernel runs three warpgroups per block: two compute warpgroups of 64 rows each (the fixed
tile of the block: 128 queries, or 128 keys for dK/dV) and one memory warpgroup that streams the
other operand's tiles through a ring of shared-memory stages by TMA. The stream covers only the
window band of the fixed tile (a static number of tiles, O(window) per block, not O(length)), so
time is O(length * window). Each compute warpgroup splits the stream in five ranges: tiles it sees
nothing of (only the barriers are kept in step), tiles cut by the causal or the window edge
(masked), and the wholly visible tiles between them (no mask). Matmuls are bf16/f16 wgmma with f32
accumulation; the softmax is base 2 and online in the forward.

ALiBi: the bias -slope * (i - j) of a tile is a fixed [64, tile] pattern -slope * (row - col),
built once per warpgroup, plus a per-tile constant, so each tile pays one add for it.

Decoding (sliding_window_decode, one new query per sequence against a ring-buffer cache) is one
warpgroup per (batch, kv head): the query heads of the kv head form the rows of one zero-padded
64-row tile, and the whole ring streams past it block_k slots at a time by TMA.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.sliding_window import (alibi_slopes, check_decode_inputs, check_shapes,
                                           differentiable, key_blocks, query_blocks,
                                           sliding_window_decode_reference,
                                           sliding_window_reference, slopes_or_zeros,
                                           slot_distance)

__all__ = ["MosaicBlockSizes", "alibi_slopes", "sliding_window_attention",
           "sliding_window_decode", "sliding_window_decode_reference", "sliding_window_reference",
           "unsupported_reason"]

_LOG2E = math.log2(math.e)
# Finite, so that a row whose first tiles are wholly masked gives exp2(0) = 1 instead of NaN; the
# online softmax wipes that out (factor exp2(_MASK_VALUE - real max) = 0) at its first visible key.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_ROWS = 64  # rows of one compute warpgroup's tile: the wgmma M dimension
_COMPUTE_WGS = 2
_HEAD_DIMS = (64, 128)
_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
  """Streamed tile sizes and pipeline depths of the three kernels (the fixed tiles are 2 x 64).

  block_k: keys per stream step of the forward and of decoding; block_k_dq: of the dQ
  kernel; block_q_dkv: queries per stream step of the dK/dV kernel. stages: shared-memory slots of
  each stream (TMA runs up to stages - 1 tiles ahead of the compute warpgroups); decoding has
  `stages` steps in flight.
  """
  block_k: int = 64
  stages: int = 3
  block_k_dq: int = 64
  stages_dq: int = 3
  block_q_dkv: int = 64
  stages_dkv: int = 3

  def __post_init__(self):
    for field in ("block_k", "block_k_dq", "block_q_dkv"):
      if getattr(self, field) not in (64, 128):
        raise ValueError(f"{field}={getattr(self, field)} must be 64 or 128")
    for field in ("stages", "stages_dq", "stages_dkv"):
      if getattr(self, field) < 2:
        raise ValueError(f"{field}={getattr(self, field)} must be >= 2")

  @property
  def length_multiple(self) -> int:
    """The length must be a multiple of this: every fixed and streamed tile divides it."""
    return max(_COMPUTE_WGS * _ROWS, self.block_k, self.block_k_dq, self.block_q_dkv)


# Hopper's 227 KiB of shared memory per block, less a margin for the barriers.
_SMEM_BYTES = 227 * 1024 - 1024


def _smem_bytes(head_dim: int, group: int, itemsize: int, bs: MosaicBlockSizes) -> int:
  """Largest shared memory of the three kernels (the scratch lists of _forward, _dq and _dkv)."""
  fixed = _COMPUTE_WGS * _ROWS * head_dim * itemsize  # one [2, 64, head_dim] tile
  streamed = lambda stages, block: 2 * stages * block * head_dim * itemsize  # two rings
  forward = fixed + _COMPUTE_WGS * _ROWS * 4 + streamed(bs.stages, bs.block_k)
  dq = 2 * fixed + _COMPUTE_WGS * 3 * _ROWS * 4 + streamed(bs.stages_dq, bs.block_k_dq)
  dkv = (2 * fixed + _COMPUTE_WGS * group * _ROWS * 4 + streamed(bs.stages_dkv, bs.block_q_dkv)
         + 2 * bs.stages_dkv * bs.block_q_dkv * 4)
  return max(forward, dq, dkv)


def unsupported_reason(q, k, v, slopes=None, *, window: int,
                       block_sizes: MosaicBlockSizes | None = None, position=None,
                       **settings) -> str | None:
  """None if sliding_window_attention (q [b, t, heads, d]) or sliding_window_decode (q [b, heads,
  d], k and v the caches, `position` given) supports these inputs, else a one-line reason.

  q, k, v may be arrays or jax.ShapeDtypeStruct. The Mosaic kernels need bf16/f16 (wgmma), head_dim
  64 or 128 (128-byte swizzled tiles) and a length (a cache length when decoding) that is a
  multiple of the tiles (no padding is done, unlike the Triton path).
  """
  block_sizes = MosaicBlockSizes() if block_sizes is None else block_sizes
  try:
    if q.ndim == 3:
      check_decode_inputs(q, k, v, position, window)
    else:
      check_shapes(q, k, v, window)
  except ValueError as e:
    return str(e)
  if q.dtype != k.dtype or q.dtype != v.dtype:
    return f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must agree"
  if jnp.dtype(q.dtype) not in map(jnp.dtype, _DTYPES):
    return f"dtype={q.dtype} must be bfloat16 or float16 (wgmma operands)"
  head_dim = q.shape[-1]
  if head_dim not in _HEAD_DIMS:
    return f"head_dim={head_dim} must be one of {_HEAD_DIMS}"
  if slopes is not None and jnp.shape(slopes) != (q.shape[-2],):
    return f"slopes shape {jnp.shape(slopes)} must be (heads,) = ({q.shape[-2]},)"
  group = q.shape[-2] // k.shape[2]
  # The training kernels' shared memory; decoding's (one fixed tile, one ring) is less.
  smem = _smem_bytes(head_dim, group, jnp.dtype(q.dtype).itemsize, block_sizes)
  if smem > _SMEM_BYTES:
    return f"block_sizes={block_sizes} need {smem} bytes of shared memory at head_dim={head_dim}" \
           f" (> {_SMEM_BYTES}): fewer stages or smaller tiles"
  if q.ndim == 3:
    if group > _ROWS:
      return f"heads per kv head={group} must be <= {_ROWS} (the rows of one decoding tile)"
    if k.shape[1] % block_sizes.block_k:
      return f"cache_len={k.shape[1]} must be a multiple of block_k={block_sizes.block_k}"
    return None
  if q.shape[1] % block_sizes.length_multiple:
    return f"length={q.shape[1]} must be a multiple of {block_sizes.length_multiple}"
  return None


def _check_supported(q, k, v, window, slopes, block_sizes, position=None):
  reason = unsupported_reason(q, k, v, slopes, window=window, block_sizes=block_sizes,
                              position=position)
  if reason is not None:
    raise ValueError(reason)


def _interpret_params(interpret: bool):
  return plgpu.InterpretGPUParams() if interpret else None


def _tile_transforms():
  """128-byte swizzled (8, 64) tiles: the smem layout wgmma reads without bank conflicts."""
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _band_steps(length: int, fixed: int, first_fn, end_fn) -> int:
  """Largest number of streamed tiles any fixed tile of the sequence needs (a static loop count)."""
  starts = np.arange(0, length, fixed)
  return int(np.max(end_fn(starts) - first_fn(starts)))


def _row_vector(x, shape):
  """[rows] in the wgmma row layout -> [rows, cols] (constant along the columns)."""
  return lax.broadcast_in_dim(x, shape, [0])


def _col_vector(x, shape):
  """[cols] in the wgmma column layout -> [rows, cols] (constant along the rows)."""
  return lax.broadcast_in_dim(x, shape, [1])


def _distance_pattern(shape, transpose: bool):
  """row - col of a tile (query - key position less the tile offsets); col - row when the rows are
  keys (transpose), in the wgmma accumulator layout."""
  row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  return col - row if transpose else row - col


def _matmul(a, b, shape, staging=None):
  """a @ b [shape] f32 by wgmma; a is smem or registers, b smem (a transposed view for a @ b.T).

  Callers add the product to their accumulator themselves rather than accumulating in a
  pl.run_state wgmma accumulator: the interpret mode cannot run run_state, and the add fuses with
  the online-softmax rescale in the forward. The interpret mode's wgmma also reads only smem
  operands, so there a register operand goes through the `staging` smem tile (None on the GPU).
  """
  if staging is not None:
    staging[...] = a
    a = staging

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]

  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _staging_tiles(interpret: bool, shape, dtype):
  """Per-warpgroup smem tiles [2, *shape] for register wgmma operands in interpret mode."""
  return plgpu.SMEM((_COMPUTE_WGS, *shape), dtype) if interpret else None


def _visible(distance, window: int):
  return (distance >= 0) & (distance <= window)


def _step_ranges(bounds, start, steps: int):
  """Tile bounds (first, mid_first, mid_end, end) of key_blocks/query_blocks -> the six edges of
  the five stream ranges [0, a) skip, [a, b) masked, [b, c) full, [c, d) masked, [d, steps) skip."""
  edges = [jnp.clip(x - start, 0, steps) for x in bounds]
  return [jnp.int32(0), *edges, jnp.int32(steps)]


def _five_range_loop(step, edges, carry):
  """Runs step(i, carry, mode=...) over [0, steps) with mode skip / masked / full per range."""
  modes = ("skip", "masked", "full", "masked", "skip")
  for mode, lo, hi in zip(modes, edges[:-1], edges[1:]):
    carry = lax.fori_loop(lo, hi, functools.partial(step, mode=mode), carry)
  return carry


def _stream(tiles, dst_smems, ready, consumed, steps: int, stages: int):
  """Memory warpgroup: TMA tiles(i) (a list of gmem refs, one per dst) of every step i < steps into
  the ring of dst smem slots [stages, ...]; a slot is refilled once both compute warpgroups have
  arrived on its consumed barriers."""
  def copy(i, slot):
    for src, dst, bar in zip(tiles(i), dst_smems, ready):
      plgpu.copy_gmem_to_smem(src, dst.at[slot], bar.at[slot])

  for i in range(min(stages, steps)):
    copy(i, i)

  def wait_consumed(i):  # step i's slot is free again
    for bar in consumed:
      plgpu.barrier_wait(bar.at[lax.rem(i, stages)])

  @pl.loop(stages, steps)
  def _(i):
    wait_consumed(i - stages)
    copy(i, lax.rem(i, stages))

  # Observes the last phases too, so that every barrier ends the kernel in step (the interpret mode
  # checks it; on the GPU the memory warpgroup only waits for the compute warpgroups to finish).
  pl.loop(max(steps - stages, 0), steps)(wait_consumed)


def _stream_key_band(k_ref, v_ref, k_smem, v_smem, ready, consumed, *, batch, kv_head, start,
                     block_k, steps: int, stages: int):
  """Memory warpgroup of the forward and dQ kernels: _stream of the keys and values of key blocks
  start .. start + steps - 1 of (batch, kv_head)."""
  plgpu.set_max_registers(40, action="decrease")

  def tiles(i):
    rows = pl.ds((start + i) * block_k, block_k)
    return [k_ref.at[batch, rows, kv_head], v_ref.at[batch, rows, kv_head]]

  _stream(tiles, [k_smem, v_smem], list(ready), list(consumed), steps, stages)


def _wait_slot(ready, consumed, slot, mode: str) -> bool:
  """A compute warpgroup's turn at a streamed slot: waits for its tiles; in a "skip" range (tiles
  it sees nothing of) hands the slot straight back. Returns whether it skipped."""
  for bar in ready:
    plgpu.barrier_wait(bar.at[slot])
  if mode == "skip":
    for bar in consumed:
      plgpu.barrier_arrive(bar.at[slot])
  return mode == "skip"


def _key_band(tile0, steps: int, block_k: int):
  """First key block streamed for queries [tile0, tile0 + 128): the band ends at their last key."""
  end = lax.div(tile0 + _COMPUTE_WGS * _ROWS - 1, block_k) + 1
  return jnp.maximum(end - steps, 0)


def _key_steps(length: int, window: int, block_k: int) -> int:
  fixed = _COMPUTE_WGS * _ROWS
  return _band_steps(length, fixed, lambda q0: np.maximum(q0 - window, 0) // block_k,
                     lambda q0: (q0 + fixed - 1) // block_k + 1)


def _query_band(tile0, steps: int, block_q: int, num_q_blocks: int):
  """First query block streamed for keys [tile0, tile0 + 128): the band starts at their first
  query, or ends at the last query of the sequence."""
  return jnp.minimum(lax.div(tile0, block_q), num_q_blocks - steps)


def _query_steps(length: int, window: int, block_q: int) -> int:
  fixed = _COMPUTE_WGS * _ROWS
  return _band_steps(length, fixed, lambda k0: k0 // block_q,
                     lambda k0: np.minimum(-(-(k0 + fixed + window) // block_q), length // block_q))


def _load_rows(smem):
  """[64] f32 smem -> a vector along the rows of a wgmma tile."""
  return plgpu.load(smem, layout=plgpu.Layout.WGMMA.reduce(1))


def _load_cols(smem):
  """[n] f32 smem -> a vector along the columns of a wgmma tile."""
  return plgpu.load(smem, layout=plgpu.Layout.WGMMA.reduce(0))


def _zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _fwd_kernel(q_ref, k_ref, v_ref, slope_ref, o_ref, lse_ref, qo_smem2, lse_smem2, k_smem,
                v_smem, p_stage2, q_bar, slope_bar, k_bar, v_bar, k_free, v_free, *, scale, window,
                block_k,
                stages, steps, group, alibi):
  """One block: queries [128 * q_tile, + 128) of (batch, head) against their window band.

  q_ref/o_ref [batch, length, heads, head_dim], k_ref/v_ref [batch, length, kv_heads, head_dim],
  slope_ref [heads, 64] (the head's slope on every row), lse_ref [batch, heads, length] f32
  (base 2).
  """
  batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  tile0 = lax.axis_index("q_seq") * (_COMPUTE_WGS * _ROWS)
  start = _key_band(tile0, steps, block_k)
  dtype = q_ref.dtype

  @pl.when(wg < _COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    r0 = tile0 + wg * _ROWS
    q_smem = qo_smem2.at[wg]
    p_stage = None if p_stage2 is None else p_stage2.at[wg]
    lse_smem = lse_smem2.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(r0, _ROWS), head], q_smem, q_bar.at[wg])
    # The lse tile holds the slopes until the end (wgmma-layout loads need smem).
    plgpu.copy_gmem_to_smem(slope_ref.at[head], lse_smem, slope_bar.at[wg])
    shape = (_ROWS, block_k)
    pattern = _distance_pattern(shape, transpose=False)
    plgpu.barrier_wait(slope_bar.at[wg])
    slope = _load_rows(lse_smem) * _LOG2E
    alibi_pattern = -_row_vector(slope, shape) * pattern.astype(jnp.float32) if alibi else None
    plgpu.barrier_wait(q_bar.at[wg])

    def step(i, carry, *, mode):
      acc, m, l = carry
      slot = lax.rem(i, stages)
      if _wait_slot((k_bar, v_bar), (k_free, v_free), slot, mode):
        return carry

      s = _matmul(q_smem, k_smem.at[slot].transpose((1, 0)), shape)
      plgpu.barrier_arrive(k_free.at[slot])
      s = s * (scale * _LOG2E)
      offset = r0 - (start + i) * block_k  # distance = pattern + offset
      if alibi:
        s = s + alibi_pattern - _row_vector(slope * offset.astype(jnp.float32), shape)
      if mode == "masked":
        s = jnp.where(_visible(pattern + offset, window), s, _MASK_VALUE)
      m_new = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - _row_vector(m_new, shape))
      l = l * alpha + p.sum(axis=1)
      pv = _matmul(p.astype(dtype), v_smem.at[slot], acc.shape, p_stage)
      acc = acc * _row_vector(alpha, acc.shape) + pv
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    head_dim = q_smem.shape[-1]
    carry = (_zeros((_ROWS, head_dim)),
             plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32),
                               plgpu.Layout.WGMMA.reduce(1)),
             plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
    edges = _step_ranges(key_blocks(r0, _ROWS, block_k, window), start, steps)
    acc, m, l = _five_range_loop(step, edges, carry)
    q_smem[...] = (acc / _row_vector(l, acc.shape)).astype(dtype)
    lse_smem[...] = m + jnp.log2(l)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(r0, _ROWS), head])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(r0, _ROWS)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE_WGS)
  def _memory():
    _stream_key_band(k_ref, v_ref, k_smem, v_smem, (k_bar, v_bar), (k_free, v_free), batch=batch,
                     kv_head=lax.div(head, group), start=start, block_k=block_k, steps=steps,
                     stages=stages)


_STATIC = ("window", "scale", "alibi", "block_sizes", "interpret")


def _tile(dtype, *shape):
  """A swizzled shared-memory tile buffer of `shape` (the last two axes a wgmma operand)."""
  return plgpu.SMEM(shape, dtype, transforms=_tile_transforms())


def _launch(kernel, *, out_type, scratch_types, grid, grid_names, interpret: bool, name: str,
            warpgroups: int = _COMPUTE_WGS + 1):
  """plgpu.kernel with what every kernel here shares: `warpgroups` warpgroups (thread axis "wg";
  the training kernels' _COMPUTE_WGS compute warpgroups and one memory warpgroup by default),
  approximate exp2, Mosaic GPU's interpreter off-GPU."""
  return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch_types, grid=grid,
                      grid_names=grid_names, num_threads=warpgroups, thread_name="wg",
                      compiler_params=plgpu.CompilerParams(approx_math=True),
                      interpret=_interpret_params(interpret), kernel_name=name)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _forward(q, k, v, slope_rows, *, window, scale, alibi, block_sizes, interpret):
  """-> (out [batch, length, heads, head_dim], lse [batch, heads, length] f32, base 2)."""
  batch, length, heads, head_dim = q.shape
  bs = block_sizes
  steps = _key_steps(length, window, bs.block_k)
  stages = min(bs.stages, steps)
  tile = functools.partial(_tile, q.dtype)
  kernel = functools.partial(_fwd_kernel, scale=scale, window=window, block_k=bs.block_k,
                             stages=stages, steps=steps, group=heads // k.shape[2], alibi=alibi)
  return _launch(
      kernel,
      out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
      scratch_types=[
          tile(_COMPUTE_WGS, _ROWS, head_dim),
          plgpu.SMEM((_COMPUTE_WGS, _ROWS), jnp.float32),
          tile(stages, bs.block_k, head_dim),
          tile(stages, bs.block_k, head_dim),
          _staging_tiles(interpret, (_ROWS, bs.block_k), q.dtype),
          plgpu.Barrier(num_barriers=_COMPUTE_WGS),
          plgpu.Barrier(num_barriers=_COMPUTE_WGS),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
          plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
      ],
      grid=(heads, length // (_COMPUTE_WGS * _ROWS), batch),
      grid_names=("heads", "q_seq", "batch"),
      interpret=interpret,
      name="sliding_window_mosaic_fwd",
  )(q, k, v, slope_rows)


def _dq_kernel(q_ref, k_ref, v_ref, slope_ref, do_ref, lse_ref, delta_ref, dq_ref, q_smem2,
               do_smem2, rows_smem2, k_smem, v_smem, ds_stage2, q_bar, do_bar, rows_bar, k_bar,
               v_bar, k_free, v_free, *, scale, window, block_k, stages, steps, group, alibi):
  """dQ of queries [128 * q_tile, + 128) of (batch, head): the forward's loop, recomputing P.

  lse_ref/delta_ref [batch, heads, length] f32; rows_smem2 [2, 3, 64] f32 holds each warpgroup's
  lse, delta and slope rows.
  """
  batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  tile0 = lax.axis_index("q_seq") * (_COMPUTE_WGS * _ROWS)
  start = _key_band(tile0, steps, block_k)
  dtype = q_ref.dtype

  @pl.when(wg < _COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    r0 = tile0 + wg * _ROWS
    q_smem, do_smem, rows_smem = q_smem2.at[wg], do_smem2.at[wg], rows_smem2.at[wg]
    ds_stage = None if ds_stage2 is None else ds_stage2.at[wg]
    query_rows = pl.ds(r0, _ROWS)
    plgpu.copy_gmem_to_smem(q_ref.at[batch, query_rows, head], q_smem, q_bar.at[wg])
    plgpu.copy_gmem_to_smem(do_ref.at[batch, query_rows, head], do_smem, do_bar.at[wg])
    for j, src in enumerate((lse_ref.at[batch, head, query_rows],
                             delta_ref.at[batch, head, query_rows], slope_ref.at[head])):
      plgpu.copy_gmem_to_smem(src, rows_smem.at[j], rows_bar.at[wg])
      plgpu.barrier_wait(rows_bar.at[wg])
    lse, delta, slope = (_load_rows(rows_smem.at[j]) for j in range(3))
    slope = slope * _LOG2E
    shape = (_ROWS, block_k)
    pattern = _distance_pattern(shape, transpose=False)
    alibi_pattern = -_row_vector(slope, shape) * pattern.astype(jnp.float32) if alibi else None
    plgpu.barrier_wait(q_bar.at[wg])
    plgpu.barrier_wait(do_bar.at[wg])

    def step(i, dq, *, mode):
      slot = lax.rem(i, stages)
      if _wait_slot((k_bar, v_bar), (k_free, v_free), slot, mode):
        return dq
      s = _matmul(q_smem, k_smem.at[slot].transpose((1, 0)), shape) * (scale * _LOG2E)
      offset = r0 - (start + i) * block_k  # distance = pattern + offset
      if alibi:
        s = s + alibi_pattern - _row_vector(lse + slope * offset.astype(jnp.float32), shape)
      else:
        s = s - _row_vector(lse, shape)
      if mode == "masked":
        s = jnp.where(_visible(pattern + offset, window), s, -jnp.inf)
      p = jnp.exp2(s)
      dp = _matmul(do_smem, v_smem.at[slot].transpose((1, 0)), shape)
      plgpu.barrier_arrive(v_free.at[slot])
      ds = p * (dp - _row_vector(delta, shape))
      dq = dq + _matmul(ds.astype(dtype), k_smem.at[slot], dq.shape, ds_stage)
      plgpu.barrier_arrive(k_free.at[slot])
      return dq

    edges = _step_ranges(key_blocks(r0, _ROWS, block_k, window), start, steps)
    dq = _five_range_loop(step, edges, _zeros((_ROWS, q_smem.shape[-1])))
    q_smem[...] = (dq * scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, query_rows, head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE_WGS)
  def _memory():
    _stream_key_band(k_ref, v_ref, k_smem, v_smem, (k_bar, v_bar), (k_free, v_free), batch=batch,
                     kv_head=lax.div(head, group), start=start, block_k=block_k, steps=steps,
                     stages=stages)


def _dkv_kernel(q_ref, k_ref, v_ref, slope_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                k_smem2, v_smem2, slope_smem2, q_smem, do_smem, lse_smem, delta_smem, stage2,
                k_bar, v_bar, slope_bar, q_bar, do_bar, lse_bar, delta_bar, free, *, scale,
                window, block_q, stages, steps, group, alibi):
  """dK, dV of keys [128 * k_tile, + 128) of (batch, kv head) from the queries of its `group` heads
  that see them: the stream runs over (head of the group, query block of the band).

  slope_smem2 [2, group, 64] f32; lse_smem/delta_smem [stages, block_q] f32.
  """
  batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("wg")
  tile0 = lax.axis_index("k_seq") * (_COMPUTE_WGS * _ROWS)
  num_q_blocks = q_ref.shape[1] // block_q
  start = _query_band(tile0, steps, block_q, num_q_blocks)
  dtype = q_ref.dtype

  @pl.when(wg < _COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    c0 = tile0 + wg * _ROWS
    k_smem, v_smem, slope_smem = k_smem2.at[wg], v_smem2.at[wg], slope_smem2.at[wg]
    stage = None if stage2 is None else stage2.at[wg]
    key_rows = pl.ds(c0, _ROWS)
    plgpu.copy_gmem_to_smem(k_ref.at[batch, key_rows, kv_head], k_smem, k_bar.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, key_rows, kv_head], v_smem, v_bar.at[wg])
    plgpu.copy_gmem_to_smem(slope_ref.at[pl.ds(kv_head * group, group)], slope_smem,
                            slope_bar.at[wg])
    shape = (_ROWS, block_q)
    pattern = _distance_pattern(shape, transpose=True)
    plgpu.barrier_wait(slope_bar.at[wg])
    plgpu.barrier_wait(k_bar.at[wg])
    plgpu.barrier_wait(v_bar.at[wg])
    edges = _step_ranges(query_blocks(c0, _ROWS, block_q, window, num_q_blocks), start, steps)
    carry = (_zeros((_ROWS, k_smem.shape[-1])), _zeros((_ROWS, v_smem.shape[-1])))
    for g in range(group):  # static: each head of the group has its own slope
      slope = _load_rows(slope_smem.at[g]) * _LOG2E
      alibi_pattern = -_row_vector(slope, shape) * pattern.astype(jnp.float32) if alibi else None

      def step(i, carry, *, mode, g=g, slope=slope, alibi_pattern=alibi_pattern):
        dk, dv = carry
        slot = lax.rem(g * steps + i, stages)
        if _wait_slot((q_bar, do_bar, lse_bar, delta_bar), (free,), slot, mode):
          return carry
        # Transposed scores: rows are keys, columns queries.
        s = _matmul(k_smem, q_smem.at[slot].transpose((1, 0)), shape) * (scale * _LOG2E)
        offset = (start + i) * block_q - c0  # distance = pattern + offset
        s = s - _col_vector(_load_cols(lse_smem.at[slot]), shape)
        if alibi:
          s = s + alibi_pattern - _row_vector(slope * offset.astype(jnp.float32), shape)
        if mode == "masked":
          s = jnp.where(_visible(pattern + offset, window), s, -jnp.inf)
        p = jnp.exp2(s)
        dv = dv + _matmul(p.astype(dtype), do_smem.at[slot], dv.shape, stage)
        dp = _matmul(v_smem, do_smem.at[slot].transpose((1, 0)), shape)
        ds = p * (dp - _col_vector(_load_cols(delta_smem.at[slot]), shape))
        dk = dk + _matmul(ds.astype(dtype), q_smem.at[slot], dk.shape, stage)
        plgpu.barrier_arrive(free.at[slot])
        return dk, dv

      carry = _five_range_loop(step, edges, carry)
    dk, dv = carry
    k_smem[...] = (dk * scale).astype(dtype)
    v_smem[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, key_rows, kv_head])
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, key_rows, kv_head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE_WGS)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")

    def tiles(i):
      head = kv_head * group + lax.div(i, steps)
      rows = pl.ds((start + lax.rem(i, steps)) * block_q, block_q)
      return [q_ref.at[batch, rows, head], do_ref.at[batch, rows, head],
              lse_ref.at[batch, head, rows], delta_ref.at[batch, head, rows]]

    _stream(tiles, [q_smem, do_smem, lse_smem, delta_smem], [q_bar, do_bar, lse_bar, delta_bar],
            [free], group * steps, stages)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _dq(q, k, v, slope_rows, do, lse, delta, *, window, scale, alibi, block_sizes, interpret):
  """dQ [batch, length, heads, head_dim]; lse/delta [batch, heads, length] f32."""
  batch, length, heads, head_dim = q.shape
  bs = block_sizes
  steps = _key_steps(length, window, bs.block_k_dq)
  stages = min(bs.stages_dq, steps)
  tile = functools.partial(_tile, q.dtype)
  kernel = functools.partial(_dq_kernel, scale=scale, window=window, block_k=bs.block_k_dq,
                             stages=stages, steps=steps, group=heads // k.shape[2], alibi=alibi)
  return _launch(
      kernel,
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_types=[
          tile(_COMPUTE_WGS, _ROWS, head_dim),
          tile(_COMPUTE_WGS, _ROWS, head_dim),
          plgpu.SMEM((_COMPUTE_WGS, 3, _ROWS), jnp.float32),
          tile(stages, bs.block_k_dq, head_dim),
          tile(stages, bs.block_k_dq, head_dim),
          _staging_tiles(interpret, (_ROWS, bs.block_k_dq), q.dtype),
          *[plgpu.Barrier(num_barriers=_COMPUTE_WGS)] * 3,
          *[plgpu.Barrier(num_barriers=stages)] * 2,
          *[plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages)] * 2,
      ],
      grid=(heads, length // (_COMPUTE_WGS * _ROWS), batch),
      grid_names=("heads", "q_seq", "batch"),
      interpret=interpret,
      name="sliding_window_mosaic_bwd_dq",
  )(q, k, v, slope_rows, do, lse, delta)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _dkv(q, k, v, slope_rows, do, lse, delta, *, window, scale, alibi, block_sizes, interpret):
  """(dK, dV) [batch, length, kv_heads, head_dim]; lse/delta [batch, heads, length] f32."""
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  bs = block_sizes
  steps = _query_steps(length, window, bs.block_q_dkv)
  stages = min(bs.stages_dkv, group * steps)
  tile = functools.partial(_tile, q.dtype)
  kernel = functools.partial(_dkv_kernel, scale=scale, window=window, block_q=bs.block_q_dkv,
                             stages=stages, steps=steps, group=group, alibi=alibi)
  return _launch(
      kernel,
      out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_types=[
          tile(_COMPUTE_WGS, _ROWS, head_dim),
          tile(_COMPUTE_WGS, _ROWS, head_dim),
          plgpu.SMEM((_COMPUTE_WGS, group, _ROWS), jnp.float32),
          tile(stages, bs.block_q_dkv, head_dim),
          tile(stages, bs.block_q_dkv, head_dim),
          plgpu.SMEM((stages, bs.block_q_dkv), jnp.float32),
          plgpu.SMEM((stages, bs.block_q_dkv), jnp.float32),
          _staging_tiles(interpret, (_ROWS, bs.block_q_dkv), q.dtype),
          *[plgpu.Barrier(num_barriers=_COMPUTE_WGS)] * 3,
          *[plgpu.Barrier(num_barriers=stages)] * 4,
          plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
      ],
      grid=(kv_heads, length // (_COMPUTE_WGS * _ROWS), batch),
      grid_names=("kv_heads", "k_seq", "batch"),
      interpret=interpret,
      name="sliding_window_mosaic_bwd_dkv",
  )(q, k, v, slope_rows, do, lse, delta)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _backward(q, k, v, slope_rows, out, lse, do, **static):
  """Forward residuals and output cotangent -> (dq, dk, dv)."""
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
  dk, dv = _dkv(q, k, v, slope_rows, do, lse, delta, **static)
  return _dq(q, k, v, slope_rows, do, lse, delta, **static), dk, dv


def _slope_rows(slopes, heads):
  """[heads] slopes (or zeros) -> [heads, 64] f32: a row vector per head that one wgmma-layout load
  reads (no scalar loads from global memory)."""
  return jnp.broadcast_to(slopes_or_zeros(slopes, heads)[:, None], (heads, _ROWS))


def sliding_window_attention(q, k, v, slopes=None, *, window: int, scale: float,
                             block_sizes: MosaicBlockSizes | None = None,
                             interpret: bool = False) -> jax.Array:
  """Sliding-window attention (same semantics as sliding_window_reference) with Mosaic GPU kernels.

  Args:
    q: [batch, length, heads, head_dim], bfloat16/float16; head_dim 64 or 128; length a multiple of
      block_sizes.length_multiple (128 with the default sizes).
    k, v: [batch, length, kv_heads, head_dim], q's dtype.
    slopes: optional [heads] ALiBi slopes (float32, receive no gradient); None disables ALiBi.
    window: keys at distance <= window are visible (0 = only itself).
    scale: logit scale (usually head_dim ** -0.5).
    block_sizes: streamed tiles and pipeline depths; None = MosaicBlockSizes().
    interpret: run the kernels in Mosaic GPU's interpret mode (CPU tests).
  Returns:
    [batch, length, heads, head_dim] in q's dtype; softmax and accumulation in float32.
    Differentiable in q, k, v (jax.custom_vjp).
  Raises:
    ValueError with unsupported_reason(...) for inputs the kernels do not take.
  """
  block_sizes = MosaicBlockSizes() if block_sizes is None else block_sizes
  _check_supported(q, k, v, window, slopes, block_sizes)
  return _attention(q, k, v, _slope_rows(slopes, q.shape[2]), min(window, q.shape[1]),
                    float(scale), slopes is not None, block_sizes, interpret)


_attention = differentiable(_forward, _backward)


def _decode_kernel(q_ref, k_ref, v_ref, slope_ref, position_ref, o_ref, q_smem, k_smem, v_smem,
                   slope_smem, p_stage, q_bar, slope_bar, k_bar, v_bar, *, scale, window, block_k,
                   stages, alibi):
  """One program: the query heads of one (batch, kv head), zero-padded to 64 rows, against every
  slot of that kv head's ring; block_k slots per step, `stages` steps in flight.

  q_ref/o_ref [batch, kv_heads, 64, head_dim]; k_ref/v_ref [batch, cache_len, kv_heads, head_dim];
  slope_ref [kv_heads, 64] f32 (each row's head slope); position_ref int32 [batch].
  """
  batch, kv_head = lax.axis_index("batch"), lax.axis_index("kv_heads")
  cache_len = k_ref.shape[1]
  steps = cache_len // block_k
  position = position_ref[batch]
  dtype = q_ref.dtype

  def fetch(i, slot):
    rows = pl.ds(i * block_k, block_k)
    plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[slot], v_bar.at[slot])

  plgpu.copy_gmem_to_smem(q_ref.at[batch, kv_head], q_smem, q_bar.at[0])
  plgpu.copy_gmem_to_smem(slope_ref.at[kv_head], slope_smem, slope_bar.at[0])
  for i in range(stages):
    fetch(i, i)
  plgpu.barrier_wait(slope_bar.at[0])
  slope = _load_rows(slope_smem) * _LOG2E
  plgpu.barrier_wait(q_bar.at[0])

  def visible_slots(i, shape, axis):
    """(visible, distance) of the slots of step i, along `axis` of a tile (as the reference's)."""
    slots = i * block_k + plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA)
    distance = slot_distance(position, slots, cache_len)
    return (distance <= window) & (distance <= position), distance

  shape = (_ROWS, block_k)
  v_shape = (block_k, v_smem.shape[-1])

  def step(i, carry):
    acc, m, l = carry
    slot = lax.rem(i, stages)
    plgpu.barrier_wait(k_bar.at[slot])
    s = _matmul(q_smem, k_smem.at[slot].transpose((1, 0)), shape) * (scale * _LOG2E)
    visible, distance = visible_slots(i, shape, 1)
    if alibi:
      s = s - _row_vector(slope, shape) * distance.astype(jnp.float32)
    s = jnp.where(visible, s, _MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - _row_vector(m_new, shape))
    l = l * alpha + p.sum(axis=1)
    plgpu.barrier_wait(v_bar.at[slot])
    # Hidden slots may hold anything (NaN where never written): p is 0 there, but 0 * NaN is NaN,
    # so their values are zeroed before the product.
    v = plgpu.load(v_smem.at[slot], layout=plgpu.Layout.WGMMA)
    v_smem[slot] = jnp.where(visible_slots(i, v_shape, 0)[0], v, jnp.zeros_like(v))
    plgpu.commit_smem()
    pv = _matmul(p.astype(dtype), v_smem.at[slot], acc.shape, p_stage)
    acc = acc * _row_vector(alpha, acc.shape) + pv

    @pl.when(i + stages < steps)
    def _():  # both tiles of `slot` are consumed: the wgmma results above were read
      fetch(i + stages, slot)

    return acc, m_new, l

  rows = plgpu.Layout.WGMMA.reduce(1)
  carry = (_zeros((_ROWS, q_smem.shape[-1])),
           plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), rows),
           plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), rows))
  acc, _, l = lax.fori_loop(0, steps, step, carry)
  q_smem[...] = (acc / _row_vector(l, acc.shape)).astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, kv_head])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _decode(q_rows, k_cache, v_cache, slope_rows, position, *, window, scale, alibi, block_sizes,
            interpret):
  """q_rows [batch, kv_heads, 64, head_dim] -> like it (the rows past each group's heads are
  padding); slope_rows [kv_heads, 64] f32."""
  batch, kv_heads, _, head_dim = q_rows.shape
  bs = block_sizes
  stages = min(bs.stages, k_cache.shape[1] // bs.block_k)
  tile = functools.partial(_tile, q_rows.dtype)
  kernel = functools.partial(_decode_kernel, scale=scale, window=window, block_k=bs.block_k,
                             stages=stages, alibi=alibi)
  return _launch(
      kernel,
      out_type=jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype),
      scratch_types=[
          tile(_ROWS, head_dim),
          tile(stages, bs.block_k, head_dim),
          tile(stages, bs.block_k, head_dim),
          plgpu.SMEM((_ROWS,), jnp.float32),
          # p's staging tile for _matmul (interpret mode only)
          plgpu.SMEM((_ROWS, bs.block_k), q_rows.dtype) if interpret else None,
          plgpu.Barrier(num_barriers=1),
          plgpu.Barrier(num_barriers=1),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=stages),
      ],
      grid=(kv_heads, batch),
      grid_names=("kv_heads", "batch"),
      interpret=interpret,
      name="sliding_window_mosaic_decode",
      warpgroups=1,
  )(q_rows, k_cache, v_cache, slope_rows, position)


def sliding_window_decode(q, k_cache, v_cache, slopes=None, *, window: int, scale: float, position,
                          block_sizes: MosaicBlockSizes | None = None,
                          interpret: bool = False) -> jax.Array:
  """One decoding step of sliding-window attention against a ring-buffer KV cache, as a Mosaic
  GPU kernel (same semantics and arguments as sliding_window_decode_reference).

  Args:
    q: [batch, heads, head_dim], bfloat16/float16; head_dim 64 or 128; at most 64 heads per kv head.
    k_cache, v_cache: [batch, cache_len, kv_heads, head_dim], q's dtype; position p in slot
      p % cache_len, the new query's own key/value already written; cache_len >= window + 1 and a
      multiple of block_sizes.block_k (64 by default).
    slopes: optional [heads] ALiBi slopes (float32); None disables ALiBi.
    window: keys at distance <= window are visible.
    scale: logit scale.
    position: int [batch], absolute position of each new query (>= 0). Slots holding positions
      older than position - window, or not yet written (p < 0), are ignored, whatever they hold.
    block_sizes: block_k (slots per step) and stages (steps in flight); None = MosaicBlockSizes().
    interpret: run the kernel in Mosaic GPU's interpret mode (CPU tests).
  Returns:
    [batch, heads, head_dim] in q's dtype. Time is O(cache_len), not differentiable.
  Raises:
    ValueError with unsupported_reason(...) for inputs the kernel does not take.
  """
  block_sizes = MosaicBlockSizes() if block_sizes is None else block_sizes
  position = jnp.asarray(position, jnp.int32)
  _check_supported(q, k_cache, v_cache, window, slopes, block_sizes, position)
  batch, heads, head_dim = q.shape
  kv_heads = k_cache.shape[2]
  group = heads // kv_heads
  pad = _ROWS - group
  q_rows = jnp.pad(q.reshape(batch, kv_heads, group, head_dim), ((0, 0), (0, 0), (0, pad), (0, 0)))
  slope_rows = jnp.pad(slopes_or_zeros(slopes, heads).reshape(kv_heads, group), ((0, 0), (0, pad)))
  out = _decode(q_rows, k_cache, v_cache, slope_rows, position, window=window, scale=float(scale),
                alibi=slopes is not None, block_sizes=block_sizes, interpret=interpret)
  return out[:, :, :group].reshape(batch, heads, head_dim)
