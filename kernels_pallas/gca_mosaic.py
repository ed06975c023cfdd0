"""Grouped cross-attention (GCA) as Mosaic GPU kernels for Hopper (docs/specification.md §3.1).

The same functions as kernels_pallas/gca.py (whose gca_reference and gca_decode_reference define
them, and whose input checks and inverted index this module reuses), written with
`jax.experimental.pallas.mosaic_gpu` instead of the deprecated Triton lowering: TMA copies into
swizzled shared memory, mbarriers and wgmma on 64-row tiles.

Shapes (einsum letters): q [batch, chunks, chunk_len, heads, head_dim] ("bnshd");
k_mem, v_mem [batch, mem_chunks, mem_len, kv_heads, head_dim] ("bmtkd");
indices, weights [batch, chunks, k] ("bni").

Kernels (one warpgroup each; a chunk of 64 rows and a memory chunk of 64 keys are one wgmma tile,
so the softmax of a slot needs no online rescaling):
- "mosaic_gca_fwd", one program per (batch, head, query chunk): loops over the k slots, reading
  the slot's memory chunk id from `indices` and TMA-copying that chunk's K/V tile, with
  `max_concurrent_steps` slots in flight; the weighted sum over slots accumulates in f32.
- "mosaic_gca_bwd_dq", same grid: dQ and D_i = rowsum(P_i * dP_i) per slot (docs/specification.md
  §3.3), which gives dw (dw_i = sum over heads and rows of D_i) and the dK/dV kernel's D.
- "mosaic_gca_bwd_dkdv", one program per (batch, head, memory chunk): loops over the (query chunk,
  slot) pairs that retrieved the chunk (gca.retrievers), so every dK/dV row is written once,
  without atomics; GQA heads of one kv head are summed afterwards.
"""

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from kernels_pallas.gca import check_decode_inputs
from kernels_pallas.gca import check_gca_inputs
from kernels_pallas.gca import KernelSettings
from kernels_pallas.gca import differentiable
from kernels_pallas.gca import gca_decode_reference
from kernels_pallas.gca import gca_reference
from kernels_pallas.gca import retrievers

# gca_reference and gca_decode_reference (gca.py's) define what gca and gca_decode compute.
__all__ = ["GCABlockSizes", "gca", "gca_decode", "gca_decode_reference", "gca_reference",
           "unsupported_reason", "decode_unsupported_reason"]

_LOG2E = 1.4426950408889634
_TILE = 64  # rows of one wgmma tile: a query chunk and a memory chunk are exactly one tile
_HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class GCABlockSizes:
  """Pipelining of the three Mosaic GCA kernels.

  max_concurrent_steps: K/V tiles (forward, dQ) or Q/dO tiles (dK/dV) in flight per program,
    i.e. the number of shared-memory buffers each of them gets.
  """
  max_concurrent_steps: int = 2

  def __post_init__(self):
    if not 1 <= self.max_concurrent_steps <= 4:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be in [1, 4]")


def unsupported_reason(q, k_mem, *arrays, block_sizes=None, **settings) -> str | None:
  """Why the Mosaic kernels cannot run gca's or gca_decode's arguments here, or None if they can.

  q [batch, chunks, chunk_len, heads, head_dim] (gca) or [batch, rows, heads, head_dim]
  (gca_decode); k_mem [batch, mem_chunks, mem_len, kv_heads, head_dim]. Only shapes, dtypes and
  the local device are looked at (a CPU host may lower for CUDA; the kernels run on Hopper): the
  other arrays and the settings (scale, num_keys, off-by-one) limit nothing.
  """
  if q.ndim == 4:
    if not 1 <= q.shape[1] <= _TILE:
      return f"decode rows={q.shape[1]} must be in [1, {_TILE}]"
  elif q.shape[2] != _TILE:
    return f"chunk_len={q.shape[2]} must be {_TILE}"
  if k_mem.shape[2] != _TILE:
    return f"mem_len={k_mem.shape[2]} must be {_TILE}"
  if q.shape[-1] not in _HEAD_DIMS:
    return f"head_dim={q.shape[-1]} must be one of {_HEAD_DIMS}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"q dtype {q.dtype} must be bfloat16 or float16"
  if k_mem.dtype != q.dtype:
    return f"k_mem dtype {k_mem.dtype} must equal q dtype {q.dtype}"
  if block_sizes is not None and not isinstance(block_sizes, GCABlockSizes):
    return f"block_sizes={block_sizes!r} must be a gca_mosaic.GCABlockSizes or None"
  device = jax.devices()[0]
  if device.platform == "gpu":
    major = int(float(getattr(device, "compute_capability", "0") or 0))
    if major != 9:
      return f"device {device.device_kind} is not Hopper (compute capability 9.x)"
  return None


decode_unsupported_reason = unsupported_reason  # one check reads both layouts of q


def _tile_smem(num, dtype, head_dim):
  """`num` swizzled [64, head_dim] tiles in shared memory, the layout wgmma operands need
  (num=None: one tile, [64, head_dim])."""
  swizzle = plgpu.find_swizzle(head_dim * jnp.finfo(dtype).bits)
  transforms = (plgpu.TilingTransform((8, swizzle * 8 // jnp.finfo(dtype).bits)),
                plgpu.SwizzleTransform(swizzle))
  shape = (_TILE, head_dim) if num is None else (num, _TILE, head_dim)
  return plgpu.SMEM(shape, dtype, transforms=transforms)


def _matmul(a, b, shape):
  """a @ b on the tensor cores, f32 [shape]; a is a register array or SMEM ref, b an SMEM ref."""

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _lhs(x, smem, *, interpret):
  """x (registers) as a wgmma left operand. The interpreter's wgmma reads both operands from
  shared memory, so there x goes through `smem` (a swizzled tile like x); on the GPU, wgmma takes
  it straight from registers."""
  if not interpret:
    return x
  smem[...] = x
  plgpu.commit_smem()
  return smem


def _masked_logits(s, *, scale, num_keys, key_axis):
  """Base-2 logits of an f32 wgmma tile, keys at index >= num_keys (along key_axis) masked."""
  s = s * (scale * _LOG2E)
  if num_keys < _TILE:
    key = plgpu.broadcasted_iota(jnp.int32, s.shape, key_axis, layout=plgpu.Layout.WGMMA)
    s = jnp.where(key < num_keys, s, -jnp.inf)
  return s


def _p_smem(dtype, st):
  """The [64, 64] tile _lhs needs in interpret mode (None on the GPU: no shared memory)."""
  return _tile_smem(None, dtype, _TILE) if st.interpret else None


def _row(vector, shape, axis):
  """Broadcasts a per-row (axis=0) or per-column (axis=1) vector to `shape`."""
  return lax.broadcast_in_dim(vector, shape, [axis])


def _params(st: KernelSettings):
  return dict(compiler_params=plgpu.CompilerParams(approx_math=not st.interpret),
              interpret=plgpu.InterpretGPUParams() if st.interpret else False)


def _slot_fetcher(idx_ref, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, group):
  """fetch(i, buf) for a program of the row grid (batch, heads, chunks): TMA-copies the K/V tiles
  of the memory chunk that slot i of this query chunk retrieved into buffer buf (idx_ref [batch,
  chunks, k]; k_smem, v_smem [stages, 64, head_dim], one barrier per buffer each)."""
  h, n, b = lax.axis_index("heads"), lax.axis_index("chunks"), lax.axis_index("batch")
  kvh = lax.div(h, jnp.int32(group))

  def fetch(i, buf):
    m = idx_ref[b, n, i]
    plgpu.copy_gmem_to_smem(k_ref.at[b, m, :, kvh], k_smem.at[buf], k_bar.at[buf])
    plgpu.copy_gmem_to_smem(v_ref.at[b, m, :, kvh], v_smem.at[buf], v_bar.at[buf])
  return fetch


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, w_ref, o_ref, lse_ref, q_smem, k_smem, v_smem,
                lse_smem, p_smem, q_bar, k_bar, v_bar, *, scale, num_keys, softmax_off_by_one,
                group, stages, interpret):
  """One program: one query chunk (64 rows) of one head, all k slots.

  q_ref, o_ref [batch, chunks, 64, heads, head_dim]; k_ref, v_ref [batch, mem_chunks, 64,
  kv_heads, head_dim]; idx_ref int32, w_ref f32 [batch, chunks, k];
  lse_ref [batch, chunks, heads, k, 64] (base-2 log-sum-exp of each slot's logits).
  q_smem [1, 64, head_dim]; k_smem, v_smem [stages, 64, head_dim]; lse_smem [k, 64];
  p_smem [64, 64] (interpret mode only, see _lhs).
  """
  h, n, b = lax.axis_index("heads"), lax.axis_index("chunks"), lax.axis_index("batch")
  num_slots = idx_ref.shape[2]
  fetch = _slot_fetcher(idx_ref, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, group)

  plgpu.copy_gmem_to_smem(q_ref.at[b, n, :, h], q_smem.at[0], q_bar.at[0])
  for i in range(min(stages, num_slots)):
    fetch(i, i)
  plgpu.barrier_wait(q_bar.at[0])

  def slot(i, acc):
    buf = lax.rem(i, jnp.int32(stages))
    plgpu.barrier_wait(k_bar.at[buf])
    s = _matmul(q_smem.at[0], k_smem.at[buf].T, (_TILE, _TILE))
    s = _masked_logits(s, scale=scale, num_keys=num_keys, key_axis=1)
    row_max = s.max(axis=1)
    if softmax_off_by_one:  # the virtual key of logit 0 enters max and sum
      row_max = jnp.maximum(row_max, 0.0)
    p = jnp.exp2(s - _row(row_max, s.shape, 0))
    denom = p.sum(axis=1)
    if softmax_off_by_one:
      denom = denom + jnp.exp2(-row_max)
    lse_smem[i] = row_max + jnp.log(denom) * _LOG2E
    plgpu.barrier_wait(v_bar.at[buf])
    p = _lhs(p.astype(v_smem.dtype), p_smem, interpret=interpret)
    o = _matmul(p, v_smem.at[buf], acc.shape)

    @pl.when(i + stages < num_slots)
    def _():  # both tiles of `buf` are consumed: the wgmma results above were read
      fetch(i + stages, buf)

    return acc + o * _row(w_ref[b, n, i] / denom, acc.shape, 0)

  acc = plgpu.layout_cast(jnp.zeros((_TILE, q_smem.shape[2]), jnp.float32), plgpu.Layout.WGMMA)
  acc = lax.fori_loop(0, num_slots, slot, acc)
  q_smem[0] = acc.astype(q_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem.at[0], o_ref.at[b, n, :, h])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, n, h])
  plgpu.wait_smem_to_gmem(0)


def _row_grid(q):
  """(batch, heads, chunks): Mosaic GPU launches the last axis fastest, so the programs in flight
  share a head and gather that head's K/V tiles (4 MB at the paper's shape), which stay in L2
  across the chunks retrieving them; HBM then reads each tile about once per head."""
  batch, chunks, _, heads, _ = q.shape
  return batch, heads, chunks


@functools.partial(jax.jit, static_argnames=("st",))
def _gca_fwd_call(q, k_mem, v_mem, indices, weights, st: KernelSettings):
  batch, chunks, _, heads, head_dim = q.shape
  num_slots = indices.shape[2]
  stages = min(st.block_sizes.max_concurrent_steps, num_slots)
  kernel = functools.partial(_fwd_kernel, scale=st.scale, num_keys=st.num_keys,
                             softmax_off_by_one=st.softmax_off_by_one,
                             group=heads // k_mem.shape[3], stages=stages,
                             interpret=st.interpret)
  lse_shape = (batch, chunks, heads, num_slots, _TILE)
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct(lse_shape, jnp.float32)),
      scratch_types=(_tile_smem(1, q.dtype, head_dim), _tile_smem(stages, q.dtype, head_dim),
                     _tile_smem(stages, q.dtype, head_dim),
                     plgpu.SMEM((num_slots, _TILE), jnp.float32), _p_smem(q.dtype, st),
                     plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=stages),
                     plgpu.Barrier(num_barriers=stages)),
      grid=_row_grid(q), grid_names=("batch", "heads", "chunks"),
      kernel_name="mosaic_gca_fwd", **_params(st),
  )(q, k_mem, v_mem, indices, weights.astype(jnp.float32))


def _dq_kernel(q_ref, k_ref, v_ref, idx_ref, w_ref, do_ref, lse_ref, dq_ref, d_ref, q_smem,
               do_smem, k_smem, v_smem, lse_smem, d_smem, ds_smem, q_bar, k_bar, v_bar, *, scale,
               num_keys, group, stages, interpret):
  """dQ and each slot's D of one query chunk and head; same grid and slot loop as _fwd_kernel.

  do_ref, dq_ref like q_ref; lse_ref, d_ref [batch, chunks, heads, k, 64] (d_ref: D_i =
  rowsum(P_i * dP_i), dP_i = dO V_i^T, for every slot: a weight-0 slot still has a weight
  gradient). q_smem, do_smem [1, 64, head_dim]; lse_smem, d_smem [k, 64]; ds_smem as _lhs.
  """
  h, n, b = lax.axis_index("heads"), lax.axis_index("chunks"), lax.axis_index("batch")
  num_slots = idx_ref.shape[2]
  fetch = _slot_fetcher(idx_ref, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, group)

  plgpu.copy_gmem_to_smem(q_ref.at[b, n, :, h], q_smem.at[0], q_bar.at[0])
  plgpu.copy_gmem_to_smem(do_ref.at[b, n, :, h], do_smem.at[0], q_bar.at[1])
  plgpu.copy_gmem_to_smem(lse_ref.at[b, n, h], lse_smem, q_bar.at[2])
  for i in range(min(stages, num_slots)):
    fetch(i, i)
  for i in range(3):
    plgpu.barrier_wait(q_bar.at[i])

  def slot(i, dq):
    buf = lax.rem(i, jnp.int32(stages))
    plgpu.barrier_wait(k_bar.at[buf])
    s = _matmul(q_smem.at[0], k_smem.at[buf].T, (_TILE, _TILE))
    s = _masked_logits(s, scale=scale, num_keys=num_keys, key_axis=1)
    lse = plgpu.load(lse_smem.at[i], layout=plgpu.Layout.WGMMA.reduce(1))
    p = jnp.exp2(s - _row(lse, s.shape, 0))
    plgpu.barrier_wait(v_bar.at[buf])
    dp = _matmul(do_smem.at[0], v_smem.at[buf].T, s.shape)
    d = (p * dp).sum(axis=1)
    d_smem[i] = d
    ds = p * (dp - _row(d, s.shape, 0)) * w_ref[b, n, i]
    ds = _lhs(ds.astype(k_smem.dtype), ds_smem, interpret=interpret)
    dq = dq + _matmul(ds, k_smem.at[buf], dq.shape)

    @pl.when(i + stages < num_slots)
    def _():
      fetch(i + stages, buf)

    return dq

  dq = plgpu.layout_cast(jnp.zeros((_TILE, q_smem.shape[2]), jnp.float32), plgpu.Layout.WGMMA)
  dq = lax.fori_loop(0, num_slots, slot, dq)
  q_smem[0] = (dq * scale).astype(q_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem.at[0], dq_ref.at[b, n, :, h])
  plgpu.copy_smem_to_gmem(d_smem, d_ref.at[b, n, h])
  plgpu.wait_smem_to_gmem(0)


def _dkdv_kernel(q_ref, k_ref, v_ref, w_ref, do_ref, lse_ref, d_ref, order_ref, starts_ref,
                 dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem, lse_smem, d_smem, ds_smem,
                 kv_bar, q_bar, do_bar, lse_bar, d_bar, *, scale, num_keys, group, stages,
                 interpret):
  """dK, dV of one memory chunk for one head: a loop over the (query chunk, slot) pairs that
  retrieved it, `stages` pairs' Q/dO/lse/D in flight.

  order_ref [batch, chunks * k], starts_ref [batch, mem_chunks + 1]: gca.retrievers (weight-0
  slots are never listed); dk_ref, dv_ref [batch, mem_chunks, 64, heads, head_dim] (one head's
  part; a GQA group's heads are summed by the caller). k_smem, v_smem [1, 64, head_dim];
  q_smem, do_smem [stages, 64, head_dim]; lse_smem, d_smem [stages, 64]; ds_smem as _lhs.
  """
  h, m, b = lax.axis_index("heads"), lax.axis_index("mem_chunks"), lax.axis_index("batch")
  kvh = lax.div(h, jnp.int32(group))
  num_slots = w_ref.shape[2]
  start, end = starts_ref[b, m], starts_ref[b, m + 1]

  def pair_slot(e):
    flat = order_ref[b, e]
    return lax.div(flat, jnp.int32(num_slots)), lax.rem(flat, jnp.int32(num_slots))

  def fetch(e, buf):
    n, i = pair_slot(e)
    plgpu.copy_gmem_to_smem(q_ref.at[b, n, :, h], q_smem.at[buf], q_bar.at[buf])
    plgpu.copy_gmem_to_smem(do_ref.at[b, n, :, h], do_smem.at[buf], do_bar.at[buf])
    plgpu.copy_gmem_to_smem(lse_ref.at[b, n, h, i], lse_smem.at[buf], lse_bar.at[buf])
    plgpu.copy_gmem_to_smem(d_ref.at[b, n, h, i], d_smem.at[buf], d_bar.at[buf])

  plgpu.copy_gmem_to_smem(k_ref.at[b, m, :, kvh], k_smem.at[0], kv_bar.at[0])
  plgpu.copy_gmem_to_smem(v_ref.at[b, m, :, kvh], v_smem.at[0], kv_bar.at[1])
  for j in range(stages):
    pl.when(start + j < end)(functools.partial(fetch, start + j, j))
  plgpu.barrier_wait(kv_bar.at[0])
  plgpu.barrier_wait(kv_bar.at[1])
  transposed = plgpu.Layout.WGMMA.reduce(0)  # per query row of a [keys, rows] tile

  def pair(e, carry):
    dk, dv = carry
    buf = lax.rem(e - start, jnp.int32(stages))
    n, i = pair_slot(e)
    w = w_ref[b, n, i]
    plgpu.barrier_wait(q_bar.at[buf])
    s_t = _matmul(k_smem.at[0], q_smem.at[buf].T, (_TILE, _TILE))
    s_t = _masked_logits(s_t, scale=scale, num_keys=num_keys, key_axis=0)
    plgpu.barrier_wait(lse_bar.at[buf])
    p_t = jnp.exp2(s_t - _row(plgpu.load(lse_smem.at[buf], layout=transposed), s_t.shape, 1))
    plgpu.barrier_wait(do_bar.at[buf])
    wp_t = _lhs((p_t * w).astype(do_smem.dtype), ds_smem, interpret=interpret)
    dv = dv + _matmul(wp_t, do_smem.at[buf], dv.shape)
    dp_t = _matmul(v_smem.at[0], do_smem.at[buf].T, s_t.shape)
    plgpu.barrier_wait(d_bar.at[buf])
    d = _row(plgpu.load(d_smem.at[buf], layout=transposed), s_t.shape, 1)
    ds_t = _lhs((p_t * (dp_t - d) * w).astype(q_smem.dtype), ds_smem, interpret=interpret)
    dk = dk + _matmul(ds_t, q_smem.at[buf], dk.shape)

    @pl.when(e + stages < end)
    def _():
      fetch(e + stages, buf)

    return dk, dv

  zeros = plgpu.layout_cast(jnp.zeros((_TILE, k_smem.shape[2]), jnp.float32), plgpu.Layout.WGMMA)
  dk, dv = lax.fori_loop(start, end, pair, (zeros, zeros))
  k_smem[0] = (dk * scale).astype(k_smem.dtype)
  v_smem[0] = dv.astype(v_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem.at[0], dk_ref.at[b, m, :, h])
  plgpu.copy_smem_to_gmem(v_smem.at[0], dv_ref.at[b, m, :, h])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("st",))
def _gca_bwd_call(q, k_mem, v_mem, indices, weights, lse, do, st: KernelSettings):
  batch, chunks, _, heads, head_dim = q.shape
  _, mem_chunks, _, kv_heads, _ = k_mem.shape
  num_slots = indices.shape[2]
  group = heads // kv_heads
  stages = st.block_sizes.max_concurrent_steps
  common = dict(scale=st.scale, num_keys=st.num_keys, group=group, interpret=st.interpret)
  weights_f32 = weights.astype(jnp.float32)
  dq_stages = min(stages, num_slots)
  dq, d = plgpu.kernel(
      functools.partial(_dq_kernel, stages=dq_stages, **common),
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct(lse.shape, jnp.float32)),
      scratch_types=(_tile_smem(1, q.dtype, head_dim), _tile_smem(1, q.dtype, head_dim),
                     _tile_smem(dq_stages, q.dtype, head_dim),
                     _tile_smem(dq_stages, q.dtype, head_dim),
                     plgpu.SMEM((num_slots, _TILE), jnp.float32),
                     plgpu.SMEM((num_slots, _TILE), jnp.float32), _p_smem(q.dtype, st),
                     plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_barriers=dq_stages),
                     plgpu.Barrier(num_barriers=dq_stages)),
      grid=_row_grid(q), grid_names=("batch", "heads", "chunks"),
      kernel_name="mosaic_gca_bwd_dq", **_params(st),
  )(q, k_mem, v_mem, indices, weights_f32, do, lse)
  order, starts = retrievers(indices, weights, mem_chunks)
  part_shape = (batch, mem_chunks, k_mem.shape[2], heads, head_dim)
  dk, dv = plgpu.kernel(
      functools.partial(_dkdv_kernel, stages=stages, **common),
      out_type=(jax.ShapeDtypeStruct(part_shape, k_mem.dtype),) * 2,
      scratch_types=(_tile_smem(1, q.dtype, head_dim), _tile_smem(1, q.dtype, head_dim),
                     _tile_smem(stages, q.dtype, head_dim), _tile_smem(stages, q.dtype, head_dim),
                     plgpu.SMEM((stages, _TILE), jnp.float32),
                     plgpu.SMEM((stages, _TILE), jnp.float32), _p_smem(q.dtype, st),
                     plgpu.Barrier(num_barriers=2),
                     *(plgpu.Barrier(num_barriers=stages),) * 4),
      # Memory chunks vary fastest: the programs in flight share one head, whose Q/dO (4 MB at
      # the paper's shape) stay in L2 for all the pairs that gather them; and early chunks, which
      # causal retrieval picks most often, start their long loops first.
      grid=(batch, heads, mem_chunks), grid_names=("batch", "heads", "mem_chunks"),
      kernel_name="mosaic_gca_bwd_dkdv", **_params(st),
  )(q, k_mem, v_mem, weights_f32, do, lse, d, order, starts)
  if group > 1:
    group_sum = lambda x: x.reshape(*k_mem.shape[:3], kv_heads, group, head_dim).sum(
        axis=4, dtype=jnp.float32).astype(k_mem.dtype)
    dk, dv = group_sum(dk), group_sum(dv)
  dw = jnp.sum(d, axis=(2, 4))  # dw_i = sum(dO * O_i) = sum over heads and rows of D_i
  return dq, dk, dv, dw.astype(weights.dtype)


_gca = differentiable(_gca_fwd_call, _gca_bwd_call)


def gca(q, k_mem, v_mem, indices, weights, *, scale: float, num_keys: int | None = None,
        softmax_off_by_one: bool = False, block_sizes: GCABlockSizes | None = None,
        interpret: bool = False) -> jax.Array:
  """FlashGCA on Mosaic GPU: gca_reference's function as fused Hopper kernels, differentiable.

  Args: as gca_reference (q [batch, chunks, chunk_len, heads, head_dim]; k_mem, v_mem [batch,
    mem_chunks, mem_len, kv_heads, head_dim]; indices, weights [batch, chunks, k]), plus
    block_sizes: pipelining; None = GCABlockSizes().
    interpret: run the kernels on CPU in Mosaic GPU's interpret mode (tests).
  Supported: chunk_len = mem_len = 64, head_dim 64 or 128, bf16 or f16 (see unsupported_reason,
  which the ValueError for anything else quotes); accumulation is f32. Indices outside
  [0, mem_chunks) are clipped, as gca_reference's gather does. Gradients flow to q, k_mem, v_mem
  and weights (indices get none).
  Returns:
    [batch, chunks, chunk_len, heads, head_dim] in q's dtype.
  """
  num_keys = k_mem.shape[2] if num_keys is None else num_keys
  check_gca_inputs(q, k_mem, v_mem, indices, weights, num_keys)
  reason = unsupported_reason(q, k_mem, block_sizes=block_sizes)
  if reason is not None:
    raise ValueError(f"gca_mosaic: {reason}")
  return _gca(q, k_mem, v_mem, indices, weights, scale=scale, num_keys=num_keys,
              softmax_off_by_one=softmax_off_by_one, block_sizes=block_sizes or GCABlockSizes(),
              interpret=interpret)


def gca_decode(q, k_mem, v_mem, indices, weights, *, scale: float, num_keys: int | None = None,
               softmax_off_by_one: bool = False, block_sizes: GCABlockSizes | None = None,
               interpret: bool = False) -> jax.Array:
  """FlashGCA for decoding: gca_decode_reference's function through the Mosaic gca kernels.

  The rows form one query chunk, zero-padded to the 64-row tile; padded rows are computed and
  dropped. q [batch, rows, heads, head_dim], rows in [1, 64]; indices, weights [batch, k].
  Returns [batch, rows, heads, head_dim].
  """
  check_decode_inputs(q, indices, weights)
  reason = unsupported_reason(q, k_mem, block_sizes=block_sizes)
  if reason is not None:
    raise ValueError(f"gca_mosaic: {reason}")
  rows = q.shape[1]
  q = jnp.pad(q, ((0, 0), (0, _TILE - rows), (0, 0), (0, 0)))
  out = gca(q[:, None], k_mem, v_mem, indices[:, None], weights[:, None], scale=scale,
            num_keys=num_keys, softmax_off_by_one=softmax_off_by_one, block_sizes=block_sizes,
            interpret=interpret)
  return out[:, 0, :rows]
