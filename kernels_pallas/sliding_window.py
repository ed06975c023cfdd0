"""Causal sliding-window attention with ALiBi (docs/specification.md §2.3): Pallas kernels and reference.

Query position i attends key positions j with i - window <= j <= i, logits scaled by `scale` and
biased by -slope_h * (i - j) when ALiBi slopes are given.
Shapes: q [batch, length, heads, head_dim], k/v [batch, length, kv_heads, head_dim]; heads is a
multiple of kv_heads (grouped-query attention: query head n uses kv head n // (heads // kv_heads)).

The kernels (Triton lowering, A100 and H100) follow FlashAttention-2 with the key loop bounded by
the window, so time is O(length * window): the forward saves the base-2 log-sum-exp, the backward
runs delta = rowsum(o * do), then a dK/dV kernel (key block fixed, loop over the query blocks that
see it) and a dQ kernel (query block fixed, loop over its key blocks). Each loop is split in three
ranges so that only the tiles cut by the causal edge or the window edge pay for the mask.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi slopes 2^(-8 (h + 1) / H), the reference's formula for every head count (§8 item 10)."""
  return 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)


def check_shapes(q, k, v, window):
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q [batch, length, heads, "
                     "head_dim] and k, v [batch, length, kv_heads, head_dim]")
  if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, length or head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"heads={q.shape[2]} must be a multiple of kv_heads={k.shape[2]}")
  if window < 0:
    raise ValueError(f"window={window} must be >= 0")


@functools.partial(jax.jit, static_argnames=("window", "scale", "block"))
def sliding_window_reference(q, k, v, slopes=None, *, window: int, scale: float, block: int = 64):
  """Plain-JAX sliding-window attention in O(length * window) memory and time.

  Queries are taken `block` at a time; each query block sees the `window` keys before it plus its
  own block, gathered as shifted views of the padded keys, so no [length, length] array exists.

  Args:
    q: [batch, length, heads, head_dim].
    k, v: [batch, length, kv_heads, head_dim].
    slopes: optional [heads] ALiBi slopes (float32); None disables ALiBi.
    window: keys at distance <= window are visible.
    scale: logit scale (usually head_dim ** -0.5).
    block: query block size of the blocking (a performance knob; the result does not depend on it).
  Returns:
    [batch, length, heads, head_dim] in q's dtype; softmax and accumulation in float32.
  """
  check_shapes(q, k, v, window)
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  block = min(block, length)
  num_blocks = -(-length // block)
  padded_len = num_blocks * block
  lookback = -(-window // block)  # key blocks before the query block
  pad_back = padded_len - length

  def pad(x, front):
    return jnp.pad(x, ((0, 0), (front, pad_back), (0, 0), (0, 0)))

  q_blocks = pad(q, 0).reshape(batch, num_blocks, block, kv_heads, group, head_dim)
  k_pad, v_pad = pad(k, lookback * block), pad(v, lookback * block)

  def key_span(x):  # [batch, num_blocks, (lookback + 1) * block, kv_heads, head_dim]
    x = x.reshape(batch, num_blocks + lookback, block, kv_heads, head_dim)
    views = [x[:, i:i + num_blocks] for i in range(lookback + 1)]
    return jnp.concatenate(views, axis=2)

  k_span, v_span = key_span(k_pad), key_span(v_pad)
  logits = jnp.einsum("bnqkgd,bnskd->bnkgqs", q_blocks, k_span,
                      preferred_element_type=jnp.float32) * scale
  q_pos = (jnp.arange(num_blocks)[:, None] * block + jnp.arange(block)[None, :])
  k_pos = (jnp.arange(num_blocks)[:, None] * block - lookback * block
           + jnp.arange((lookback + 1) * block)[None, :])
  distance = q_pos[:, :, None] - k_pos[:, None, :]  # [num_blocks, block, span]
  visible = (distance >= 0) & (distance <= window) & (k_pos[:, None, :] >= 0)
  if slopes is not None:
    slopes = jnp.asarray(slopes, jnp.float32).reshape(kv_heads, group)
    logits = logits - slopes[:, :, None, None] * distance.astype(jnp.float32)[:, None, None]
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bnkgqs,bnskd->bnqkgd", probs.astype(v.dtype), v_span,
                   preferred_element_type=jnp.float32)
  out = out.reshape(batch, padded_len, heads, head_dim)[:, :length]
  return out.astype(q.dtype)


_LOG2E = math.log2(math.e)
# Finite, so that a tile row with no visible key gives exp2(0) = 1 instead of inf - inf = NaN; the
# online softmax wipes that 1 out (factor exp2(_MASK_VALUE - real max) = 0) at the first visible key.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class SlidingWindowBlockSizes:
  """Tile sizes and Triton launch settings of the three kernels (block_k is also the decode tile).

  forward: block_q queries per program, block_k keys per loop step; dK/dV: block_k_dkv keys per
  program, block_q_dkv queries per loop step; dQ: block_q_dq queries per program, block_k_dq keys
  per loop step. Every block is a power of two >= 16 (Triton tiles and tensor-core dot shapes).
  """
  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps_dkv: int = 4
  num_stages_dkv: int = 2
  block_q_dq: int = 64
  block_k_dq: int = 64
  num_warps_dq: int = 4
  num_stages_dq: int = 2

  def __post_init__(self):
    for field in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
      value = getattr(self, field)
      if not _is_power_of_two(value) or value < 16:
        raise ValueError(f"{field}={value} must be a power of two >= 16")
    for field in ("num_warps", "num_warps_dkv", "num_warps_dq"):
      value = getattr(self, field)
      if not _is_power_of_two(value) or value > 16:
        raise ValueError(f"{field}={value} must be a power of two <= 16")
    for field in ("num_stages", "num_stages_dkv", "num_stages_dq"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field}={getattr(self, field)} must be >= 1")

  @property
  def length_multiple(self) -> int:
    """The sequence is padded to a multiple of this (every block size divides it)."""
    return max(self.block_q, self.block_k, self.block_q_dkv, self.block_k_dkv, self.block_q_dq,
               self.block_k_dq)

  @classmethod
  def for_device(cls, device: jax.Device | None = None) -> "SlidingWindowBlockSizes":
    """Sizes tuned per GPU generation (compute capability major); the safe defaults elsewhere."""
    device = jax.devices()[0] if device is None else device
    major = str(getattr(device, "compute_capability", "")).split(".")[0]
    return _TUNED_BLOCK_SIZES.get(major, cls())


# Keyed on compute capability major. 9 (H100): the fastest tiles of each kernel in the sweep of
# bench/sliding_window.py --sweep (docs/benchmarks.md), bf16, head_dim 64. 8 (A100): not measured;
# the defaults, whose bf16 tiles (2 pipeline stages) come to about 100 KB of shared memory per block
# at head_dim 128 by our count, under the A100's 164 KB.
_TUNED_BLOCK_SIZES = {
    "8": SlidingWindowBlockSizes(),
    "9": SlidingWindowBlockSizes(num_stages_dkv=3, block_k_dq=32, num_stages_dq=3),
}


def _precision(dtype):
  """f32 inputs get true f32 dots (Triton would use TF32); bf16/f16 run on the tensor cores."""
  return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _floordiv(x, n: int):
  """x // n for x >= 0 (lax.div truncates; the Triton lowering has no floor division)."""
  return lax.div(x, jnp.int32(n))


def _ceildiv(x, n: int):
  return _floordiv(x + (n - 1), n)


def _visible(q_pos, k_pos, window: int):
  """[len(q_pos), len(k_pos)] mask of i - window <= j <= i."""
  distance = q_pos[:, None] - k_pos[None, :]
  return (distance >= 0) & (distance <= window)


def key_blocks(q0, block_q: int, block_k: int, window: int):
  """Key blocks seen by queries [q0, q0 + block_q) as (first, first unmasked, end unmasked, end).

  Blocks in [first unmasked, end unmasked) are wholly visible to every query of the block:
  their last key is <= q0 (causal edge) and their first key is >= q0 + block_q - 1 - window.
  """
  first = _floordiv(jnp.maximum(q0 - window, 0), block_k)
  end = _floordiv(q0 + block_q - 1, block_k) + 1
  mid_first = jnp.minimum(_ceildiv(jnp.maximum(q0 + block_q - 1 - window, 0), block_k), end)
  mid_end = jnp.clip(_floordiv(q0 + 1, block_k), mid_first, end)
  return first, mid_first, mid_end, end


def query_blocks(k0, block_k: int, block_q: int, window: int, num_q_blocks: int):
  """Query blocks that see keys [k0, k0 + block_k), as key_blocks orders them.

  Wholly visible blocks start at or after the last key (q0 >= k0 + block_k - 1) and end within the
  window of the first key (q0 + block_q - 1 <= k0 + window).
  """
  first = _floordiv(k0, block_q)
  end = jnp.minimum(_ceildiv(k0 + block_k + window, block_q), num_q_blocks)
  mid_first = jnp.clip(_ceildiv(k0 + block_k - 1, block_q), first, end)
  mid_end = jnp.clip(_floordiv(k0 + window + 1, block_q), mid_first, end)
  return first, mid_first, mid_end, end


def _three_range_loop(body, bounds, carry):
  """Runs body(i, carry, masked=...) over [first, end); the middle range skips the mask."""
  first, mid_first, mid_end, end = bounds
  carry = lax.fori_loop(first, mid_first, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(mid_first, mid_end, functools.partial(body, masked=False), carry)
  return lax.fori_loop(mid_end, end, functools.partial(body, masked=True), carry)


# ALiBi inside the kernels. The bias -slope * (i - j) is split into a column term slope * (j - r0)
# and a row term -slope * (i - r0), r0 being the start of the block that stays fixed in the kernel.
# The row term is constant along the softmax axis, so the forward drops it and corrects the saved
# log-sum-exp once per row; the backward folds it into the log-sum-exp it subtracts. Offsets stay
# within a few blocks of r0, so no precision is lost at long lengths.


def _key_block_scores(q, k_ref, v_ref, q0, k0, cols, slope, *, scale, alibi, precision):
  """Loads key block k0 and returns (k, v, base-2 scores of q against it incl. the key-side ALiBi).

  The query-side ALiBi term cancels in the softmax (it lives in the saved log-sum-exp instead).
  """
  k = k_ref[pl.ds(k0, cols.shape[0]), :]
  v = v_ref[pl.ds(k0, cols.shape[0]), :]
  s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * _LOG2E)
  if alibi:
    s = s + (slope * (k0 - q0 + cols).astype(jnp.float32))[None, :]
  return k, v, s


def _fwd_kernel(q_ref, k_ref, v_ref, slope_ref, o_ref, lse_ref, *, scale, window, block_k, alibi):
  """One query block [block_q, head_dim] against its window of k_ref/v_ref [length, head_dim]."""
  block_q = q_ref.shape[0]
  q0 = pl.program_id(0) * block_q
  q = q_ref[...]
  precision = _precision(q.dtype)
  slope = slope_ref[...] * _LOG2E
  rows = jnp.arange(block_q)
  cols = jnp.arange(block_k)

  def body(kb, carry, *, masked):
    acc, row_max, row_sum = carry
    k0 = kb * block_k
    k, v, s = _key_block_scores(q, k_ref, v_ref, q0, k0, cols, slope, scale=scale, alibi=alibi,
                                precision=precision)
    if masked:
      s = jnp.where(_visible(q0 + rows, k0 + cols, window), s, _MASK_VALUE)
    new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
    correction = jnp.exp2(row_max - new_max)
    p = jnp.exp2(s - new_max[:, None])
    row_sum = row_sum * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
    return acc, new_max, row_sum

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  acc, row_max, row_sum = _three_range_loop(body, key_blocks(q0, block_q, block_k, window), carry)
  o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
  lse = row_max + jnp.log2(row_sum)
  if alibi:
    lse = lse - slope * rows.astype(jnp.float32)
  lse_ref[...] = lse


def _dkv_kernel(q_ref, k_ref, v_ref, slope_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                scale, window, block_q, alibi):
  """One key block [block_k, head_dim] of one kv head against the queries of its `group` heads.

  q_ref/do_ref [length, group, head_dim], lse_ref/delta_ref [group, length], slope_ref [group].
  """
  block_k = k_ref.shape[0]
  length, group, _ = q_ref.shape
  k0 = pl.program_id(0) * block_k
  k = k_ref[...]
  v = v_ref[...]
  precision = _precision(k.dtype)
  rows = jnp.arange(block_q)
  cols = jnp.arange(block_k)
  bounds = query_blocks(k0, block_k, block_q, window, length // block_q)
  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  for g in range(group):
    slope = slope_ref[g] * _LOG2E
    col_bias = slope * cols.astype(jnp.float32)

    def body(qb, carry, *, masked, g=g, slope=slope, col_bias=col_bias):
      dk, dv = carry
      q0 = qb * block_q
      q = q_ref[pl.ds(q0, block_q), g, :]
      do = do_ref[pl.ds(q0, block_q), g, :]
      lse = lse_ref[g, pl.ds(q0, block_q)]
      delta = delta_ref[g, pl.ds(q0, block_q)]
      if alibi:
        lse = lse + slope * (q0 - k0 + rows).astype(jnp.float32)
      s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * _LOG2E)
      if alibi:
        s = s + col_bias[None, :]
      s = s - lse[:, None]
      if masked:
        s = jnp.where(_visible(q0 + rows, k0 + cols, window), s, -jnp.inf)
      p = jnp.exp2(s)
      dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
      dp = plgpu.dot(do, v, trans_b=True, precision=precision)
      ds = p * (dp - delta[:, None])
      dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
      return dk, dv

    carry = _three_range_loop(body, bounds, carry)
  dk, dv = carry
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, slope_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, window,
               block_k, alibi):
  """One query block [block_q, head_dim] against its window of keys, as in the forward."""
  block_q = q_ref.shape[0]
  q0 = pl.program_id(0) * block_q
  q = q_ref[...]
  do = do_ref[...]
  delta = delta_ref[...]
  precision = _precision(q.dtype)
  slope = slope_ref[...] * _LOG2E
  rows = jnp.arange(block_q)
  cols = jnp.arange(block_k)
  lse = lse_ref[...]
  if alibi:
    lse = lse + slope * rows.astype(jnp.float32)

  def body(kb, dq, *, masked):
    k0 = kb * block_k
    k, v, s = _key_block_scores(q, k_ref, v_ref, q0, k0, cols, slope, scale=scale, alibi=alibi,
                                precision=precision)
    s = s - lse[:, None]
    if masked:
      s = jnp.where(_visible(q0 + rows, k0 + cols, window), s, -jnp.inf)
    p = jnp.exp2(s)
    dp = plgpu.dot(do, v, trans_b=True, precision=precision)
    ds = p * (dp - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

  dq = _three_range_loop(body, key_blocks(q0, block_q, block_k, window),
                         jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


_STATIC = ("window", "scale", "alibi", "block_sizes", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _forward(q, k, v, slopes, *, window, scale, alibi, block_sizes, interpret):
  """Padded inputs (length a multiple of every block) -> (out, lse [batch, heads, length] f32)."""
  batch, length, heads, head_dim = q.shape
  group = heads // k.shape[2]
  bs = block_sizes
  q_spec = pl.BlockSpec((None, bs.block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, length, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, window=window, block_k=bs.block_k, alibi=alibi),
      grid=(length // bs.block_q, batch, heads),
      in_specs=[q_spec, kv_spec, kv_spec, pl.BlockSpec((None,), lambda i, b, h: (h,))],
      out_specs=[q_spec, pl.BlockSpec((None, None, bs.block_q), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
      compiler_params=_params(bs.num_warps, bs.num_stages),
      interpret=interpret,
      name="sliding_window_fwd",
  )(q, k, v, slopes)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _dkv(q, k, v, slopes, do, lse, delta, *, window, scale, alibi, block_sizes, interpret):
  """dK, dV: one program per (key block, batch, kv head); lse/delta [batch, heads, length] f32."""
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  bs = block_sizes
  group_spec = pl.BlockSpec((None, length, group, head_dim), lambda j, b, n: (b, 0, n, 0))
  group_rows_spec = pl.BlockSpec((None, group, length), lambda j, b, n: (b, n, 0))
  k_block_spec = pl.BlockSpec((None, bs.block_k_dkv, None, head_dim), lambda j, b, n: (b, j, n, 0))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, window=window, block_q=bs.block_q_dkv,
                        alibi=alibi),
      grid=(length // bs.block_k_dkv, batch, kv_heads),
      in_specs=[group_spec, k_block_spec, k_block_spec,
                pl.BlockSpec((group,), lambda j, b, n: (n,)),
                group_spec, group_rows_spec, group_rows_spec],
      out_specs=[k_block_spec, k_block_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(bs.num_warps_dkv, bs.num_stages_dkv),
      interpret=interpret,
      name="sliding_window_bwd_dkv",
  )(q, k, v, slopes, do, lse, delta)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _dq(q, k, v, slopes, do, lse, delta, *, window, scale, alibi, block_sizes, interpret):
  """dQ: one program per (query block, batch, head); lse/delta [batch, heads, length] f32."""
  batch, length, heads, head_dim = q.shape
  group = heads // k.shape[2]
  bs = block_sizes
  q_spec = pl.BlockSpec((None, bs.block_q_dq, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, length, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
  rows_spec = pl.BlockSpec((None, None, bs.block_q_dq), lambda i, b, h: (b, h, i))
  return pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, window=window, block_k=bs.block_k_dq, alibi=alibi),
      grid=(length // bs.block_q_dq, batch, heads),
      in_specs=[q_spec, kv_spec, kv_spec, pl.BlockSpec((None,), lambda i, b, h: (h,)),
                q_spec, rows_spec, rows_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(bs.num_warps_dq, bs.num_stages_dq),
      interpret=interpret,
      name="sliding_window_bwd_dq",
  )(q, k, v, slopes, do, lse, delta)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _backward(q, k, v, slopes, out, lse, do, **static):
  """Padded inputs, forward residuals and output cotangent -> (dq, dk, dv)."""
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
  dk, dv = _dkv(q, k, v, slopes, do, lse, delta, **static)
  return _dq(q, k, v, slopes, do, lse, delta, **static), dk, dv


def differentiable(forward, backward):
  """Sliding-window attention as a custom-VJP function of (q, k, v, slopes, window, scale, alibi,
  block_sizes, interpret) over a kernel pair; the Triton kernels here and the Mosaic GPU ones
  (sliding_window_mosaic.py) share it.

  forward(q, k, v, slopes, **static) -> (out, lse);
  backward(q, k, v, slopes, out, lse, do, **static) -> (dq, dk, dv), static being window, scale,
  alibi, block_sizes and interpret. slopes: whatever per-head rows the kernels take.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
  def attention(q, k, v, slopes, window, scale, alibi, block_sizes, interpret):
    return fwd(q, k, v, slopes, window, scale, alibi, block_sizes, interpret)[0]

  def fwd(q, k, v, slopes, window, scale, alibi, block_sizes, interpret):
    out, lse = forward(q, k, v, slopes, window=window, scale=scale, alibi=alibi,
                       block_sizes=block_sizes, interpret=interpret)
    return out, (q, k, v, slopes, out, lse)

  def bwd(window, scale, alibi, block_sizes, interpret, residuals, do):
    dq, dk, dv = backward(*residuals, do, window=window, scale=scale, alibi=alibi,
                          block_sizes=block_sizes, interpret=interpret)
    # The slopes are a fixed buffer (§2.3), not trained: they get no gradient.
    return dq, dk, dv, jnp.zeros_like(residuals[3])

  attention.defvjp(fwd, bwd)
  return attention


_attention = differentiable(_forward, _backward)


def unsupported_reason(q, k, v, slopes=None, **settings) -> str | None:
  """Why sliding_window_attention (q [b, t, heads, d]) or sliding_window_decode (q [b, heads, d],
  caches for k, v) cannot run these inputs (one line; the references can), or None. None of the
  functions' settings limits the kernels."""
  head_dim = q.shape[-1]
  if not _is_power_of_two(head_dim) or not 16 <= head_dim <= 256:
    return f"head_dim={head_dim} must be a power of two in [16, 256]"
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return f"dtype={q.dtype} must be bfloat16, float16 or float32"
  return None


def _check_kernel_inputs(q, slopes):
  reason = unsupported_reason(q, None, None)
  if reason is not None:
    raise ValueError(reason)
  heads = q.shape[-2]
  if slopes is not None and jnp.shape(slopes) != (heads,):
    raise ValueError(f"slopes shape {jnp.shape(slopes)} must be (heads,) = ({heads},)")


def slopes_or_zeros(slopes, heads):
  return jnp.zeros((heads,), jnp.float32) if slopes is None else jnp.asarray(slopes, jnp.float32)


def sliding_window_attention(q, k, v, slopes=None, *, window: int, scale: float,
                             block_sizes: SlidingWindowBlockSizes | None = None,
                             interpret: bool = False) -> jax.Array:
  """Sliding-window attention (same semantics as sliding_window_reference) with Pallas kernels.

  Args:
    q: [batch, length, heads, head_dim], bfloat16/float16/float32; head_dim a power of two.
    k, v: [batch, length, kv_heads, head_dim], q's dtype.
    slopes: optional [heads] ALiBi slopes (float32, receive no gradient); None disables ALiBi.
    window: keys at distance <= window are visible (0 = only itself).
    scale: logit scale (usually head_dim ** -0.5).
    block_sizes: tiles and launch settings; None = SlidingWindowBlockSizes.for_device().
    interpret: run the kernels in the Pallas interpreter (CPU tests).
  Returns:
    [batch, length, heads, head_dim] in q's dtype; softmax and accumulation in float32.
    Differentiable in q, k, v (jax.custom_vjp).
  """
  check_shapes(q, k, v, window)
  _check_kernel_inputs(q, slopes)
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must agree")
  block_sizes = SlidingWindowBlockSizes.for_device() if block_sizes is None else block_sizes
  length = q.shape[1]
  padded = -(-length // block_sizes.length_multiple) * block_sizes.length_multiple
  # Padded keys lie after every real query, so the causal mask hides them; padded query rows get a
  # zero cotangent from the slice below and so add nothing to dK/dV.
  pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  out = _attention(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad),
                   slopes_or_zeros(slopes, q.shape[2]), min(window, padded), float(scale),
                   slopes is not None, block_sizes, interpret)
  return out[:, :length]


# Decode: one new query per sequence against a ring buffer holding the last cache_len positions;
# absolute position p lives in slot p % cache_len, so slot s holds the newest p <= position with
# p = s (mod cache_len), at distance (position - s) mod cache_len from the query.


def check_decode_inputs(q, k_cache, v_cache, position, window):
  """Raises ValueError naming the first argument of sliding_window_decode's that is malformed."""
  if q.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
    raise ValueError(f"q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}: expected q "
                     "[batch, heads, head_dim] and caches [batch, cache_len, kv_heads, head_dim]")
  batch, heads, head_dim = q.shape
  if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
    raise ValueError(f"q {q.shape} and k_cache {k_cache.shape} disagree on batch or head_dim")
  if heads % k_cache.shape[2]:
    raise ValueError(f"heads={heads} must be a multiple of kv_heads={k_cache.shape[2]}")
  if window < 0:
    raise ValueError(f"window={window} must be >= 0")
  if k_cache.shape[1] < window + 1:
    raise ValueError(f"cache_len={k_cache.shape[1]} must be >= window + 1 = {window + 1}")
  if jnp.shape(position) != (batch,):
    raise ValueError(f"position shape {jnp.shape(position)} must be (batch,) = ({batch},)")


def slot_distance(position, slots, cache_len: int):
  """Distance from the query at `position` to the position held in each slot; >= 0."""
  distance = lax.rem(position - slots, jnp.int32(cache_len))
  return jnp.where(distance < 0, distance + cache_len, distance)


@functools.partial(jax.jit, static_argnames=("window", "scale"))
def sliding_window_decode_reference(q, k_cache, v_cache, slopes=None, *, window: int, scale: float,
                                    position):
  """Plain-JAX decode step; the oracle of sliding_window_decode (same arguments)."""
  check_decode_inputs(q, k_cache, v_cache, position, window)
  batch, heads, head_dim = q.shape
  cache_len, kv_heads = k_cache.shape[1:3]
  group = heads // kv_heads
  distance = slot_distance(jnp.asarray(position, jnp.int32)[:, None], jnp.arange(cache_len),
                            cache_len)
  # Slots older than the window or never written (position < 0) are hidden, whatever they hold.
  visible = (distance <= window) & (distance <= jnp.asarray(position)[:, None])
  logits = jnp.einsum("bkgd,bskd->bkgs", q.reshape(batch, kv_heads, group, head_dim), k_cache,
                      preferred_element_type=jnp.float32) * scale
  if slopes is not None:
    slopes = jnp.asarray(slopes, jnp.float32).reshape(kv_heads, group)
    logits = logits - slopes[None, :, :, None] * distance.astype(jnp.float32)[:, None, None, :]
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  v_visible = jnp.where(visible[:, :, None, None], v_cache, 0)
  out = jnp.einsum("bkgs,bskd->bkgd", probs.astype(v_cache.dtype), v_visible,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, heads, head_dim).astype(q.dtype)


def _decode_kernel(q_ref, k_ref, v_ref, slope_ref, position_ref, o_ref, *, scale, window, block_k,
                   alibi):
  """One query [head_dim] against its sequence's cache k_ref/v_ref [cache_len, head_dim].

  A single query row is too small for a tensor-core dot: products and sums run on the vector units.
  """
  cache_len = k_ref.shape[0]
  q = q_ref[...].astype(jnp.float32)
  position = position_ref[...]
  slope = slope_ref[...] * _LOG2E

  def body(kb, carry):
    acc, row_max, row_sum = carry
    slots = kb * block_k + jnp.arange(block_k)
    distance = slot_distance(position, slots, cache_len)
    visible = (slots < cache_len) & (distance <= window) & (distance <= position)
    # Masked loads: unwritten slots may hold anything, NaN included.
    k = plgpu.load(k_ref.at[pl.ds(kb * block_k, block_k), :], mask=visible[:, None], other=0)
    v = plgpu.load(v_ref.at[pl.ds(kb * block_k, block_k), :], mask=visible[:, None], other=0)
    s = jnp.sum(k.astype(jnp.float32) * q[None, :], axis=1) * (scale * _LOG2E)
    if alibi:
      s = s - slope * distance.astype(jnp.float32)
    s = jnp.where(visible, s, _MASK_VALUE)
    new_max = jnp.maximum(row_max, jnp.max(s))
    correction = jnp.exp2(row_max - new_max)
    p = jnp.where(visible, jnp.exp2(s - new_max), 0.0)
    row_sum = row_sum * correction + jnp.sum(p)
    acc = acc * correction + jnp.sum(p[:, None] * v.astype(jnp.float32), axis=0)
    return acc, new_max, row_sum

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.float32(-jnp.inf), jnp.float32(0))
  acc, _, row_sum = lax.fori_loop(0, pl.cdiv(cache_len, block_k), body, carry)
  o_ref[...] = (acc / row_sum).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _decode(q, k_cache, v_cache, slopes, position, *, window, scale, alibi, block_sizes, interpret):
  batch, heads, head_dim = q.shape
  cache_len, kv_heads = k_cache.shape[1:3]
  group = heads // kv_heads
  q_spec = pl.BlockSpec((None, None, head_dim), lambda b, h: (b, h, 0))
  cache_spec = pl.BlockSpec((None, cache_len, None, head_dim), lambda b, h: (b, 0, h // group, 0))
  return pl.pallas_call(
      functools.partial(_decode_kernel, scale=scale, window=window, block_k=block_sizes.block_k,
                        alibi=alibi),
      grid=(batch, heads),
      in_specs=[q_spec, cache_spec, cache_spec, pl.BlockSpec((None,), lambda b, h: (h,)),
                pl.BlockSpec((None,), lambda b, h: (b,))],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(block_sizes.num_warps, block_sizes.num_stages),
      interpret=interpret,
      name="sliding_window_decode",
  )(q, k_cache, v_cache, slopes, position)


def sliding_window_decode(q, k_cache, v_cache, slopes=None, *, window: int, scale: float, position,
                          block_sizes: SlidingWindowBlockSizes | None = None,
                          interpret: bool = False) -> jax.Array:
  """One decoding step of sliding-window attention against a ring-buffer KV cache.

  Args:
    q: [batch, heads, head_dim], the new query of each sequence.
    k_cache, v_cache: [batch, cache_len, kv_heads, head_dim] with cache_len >= window + 1; position
      p is stored in slot p % cache_len, the new query's own key/value already written.
    slopes: optional [heads] ALiBi slopes (float32); None disables ALiBi.
    window: keys at distance <= window are visible.
    scale: logit scale.
    position: int [batch], absolute position of each new query (>= 0). Slots holding positions
      older than position - window, or not yet written (p < 0), are ignored.
    block_sizes: block_k is the cache tile; None = SlidingWindowBlockSizes.for_device().
    interpret: run the kernel in the Pallas interpreter (CPU tests).
  Returns:
    [batch, heads, head_dim] in q's dtype. Time is O(cache_len), not differentiable.
  """
  check_decode_inputs(q, k_cache, v_cache, position, window)
  _check_kernel_inputs(q, slopes)
  block_sizes = SlidingWindowBlockSizes.for_device() if block_sizes is None else block_sizes
  return _decode(q, k_cache, v_cache, slopes_or_zeros(slopes, q.shape[1]),
                 jnp.asarray(position, jnp.int32), window=window, scale=float(scale),
                 alibi=slopes is not None, block_sizes=block_sizes, interpret=interpret)
