"""Grouped cross-attention (GCA) over retrieved chunks (docs/specification.md §3.1).

For every query chunk and head, attend separately to each of its k retrieved memory chunks
(softmax over that chunk's keys) and mix the k results with the retrieval weights, which all
heads share: O = sum_i w_i softmax(scale * Q K_i^T) V_i.

Shapes (einsum letters): q [batch, chunks, chunk_len, heads, head_dim] ("bnshd");
k_mem, v_mem [batch, mem_chunks, mem_len, kv_heads, head_dim] ("bmtkd");
indices, weights [batch, chunks, k] ("bni"): memory chunk ids and their mixing weights.
A slot with weight 0 contributes nothing (the model's mask for chunks with fewer than k
predecessors), whatever its index points to.

gca_reference is the plain-JAX definition; gca (training, differentiable) and gca_decode (a few
query rows per sequence) compute the same function with fused Pallas kernels.
"""

import dataclasses
import functools
from typing import Any

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp


def check_gca_inputs(q, k_mem, v_mem, indices, weights, num_keys):
  """Raises ValueError naming the offending shape."""
  if q.ndim != 5 or k_mem.ndim != 5 or k_mem.shape != v_mem.shape:
    raise ValueError(f"q {q.shape}, k_mem {k_mem.shape}, v_mem {v_mem.shape}: expected q [batch, "
                     "chunks, chunk_len, heads, head_dim], k_mem/v_mem [batch, mem_chunks, mem_len, "
                     "kv_heads, head_dim]")
  if indices.shape != weights.shape or indices.shape[:2] != q.shape[:2] or indices.ndim != 3:
    raise ValueError(f"indices {indices.shape} and weights {weights.shape} must both be "
                     f"[batch, chunks, k] = {q.shape[:2]} + (k,)")
  if k_mem.shape[0] != q.shape[0] or k_mem.shape[4] != q.shape[4]:
    raise ValueError(f"q {q.shape} and k_mem {k_mem.shape} disagree on batch or head_dim")
  if q.shape[3] % k_mem.shape[3]:
    raise ValueError(f"heads={q.shape[3]} must be a multiple of kv_heads={k_mem.shape[3]}")
  if not 1 <= num_keys <= k_mem.shape[2]:
    raise ValueError(f"num_keys={num_keys} must be in [1, mem_len={k_mem.shape[2]}]")


@functools.partial(jax.jit, static_argnames=("scale", "num_keys", "softmax_off_by_one"))
def gca_reference(q, k_mem, v_mem, indices, weights, *, scale: float, num_keys: int | None = None,
                  softmax_off_by_one: bool = False):
  """Plain-JAX GCA with the gather: einsum and softmax in float32.

  Args:
    q: [batch, chunks, chunk_len, heads, head_dim].
    k_mem, v_mem: [batch, mem_chunks, mem_len, kv_heads, head_dim].
    indices: int [batch, chunks, k], values in [0, mem_chunks).
    weights: [batch, chunks, k] mixing weights (0 for invalid slots).
    scale: logit scale.
    num_keys: only the first num_keys rows of a memory chunk are keys (the rest, e.g. the
      landmark row, are masked); None = all mem_len rows.
    softmax_off_by_one: add 1 to every per-chunk softmax denominator, i.e. an implicit extra key
      with logit 0 and value 0, so a query can attend to "nothing" in an irrelevant chunk.
  Returns:
    [batch, chunks, chunk_len, heads, head_dim] in q's dtype.
  """
  num_keys = k_mem.shape[2] if num_keys is None else num_keys
  check_gca_inputs(q, k_mem, v_mem, indices, weights, num_keys)
  batch, chunks, chunk_len, heads, head_dim = q.shape
  kv_heads = k_mem.shape[3]
  gather = jax.vmap(lambda mem, idx: mem[idx])  # per batch row: [chunks, k, mem_len, kv_heads, d]
  k_ret = gather(k_mem[:, :, :num_keys], indices)
  v_ret = gather(v_mem[:, :, :num_keys], indices)
  q = q.reshape(batch, chunks, chunk_len, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("bnskgd,bnitkd->bnikgst", q, k_ret,
                      preferred_element_type=jnp.float32) * scale
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  if softmax_off_by_one:
    row_max = jnp.maximum(row_max, 0.0)
  unnormalized = jnp.exp(logits - jax.lax.stop_gradient(row_max))
  denominator = jnp.sum(unnormalized, axis=-1, keepdims=True)
  if softmax_off_by_one:
    denominator = denominator + jnp.exp(-jax.lax.stop_gradient(row_max))
  probs = unnormalized / denominator
  mixed = probs * weights.astype(jnp.float32)[:, :, :, None, None, None, None]
  out = jnp.einsum("bnikgst,bnitkd->bnskgd", mixed.astype(v_ret.dtype), v_ret,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, chunks, chunk_len, heads, head_dim).astype(q.dtype)


# FlashGCA in Pallas (Triton lowering: runs on A100 and H100).
#
# A memory chunk is at most 128 rows, so each (query block, retrieved chunk) pair is one tile: the
# softmax over a chunk needs no online rescaling, and the backward can recompute P and dP of a whole
# tile and take D = rowsum(P * dP) (= rowsum(O_i * dO), docs/specification.md §3.3) from them, which
# removes the separate D pass of FlashAttention-2 and any dependency between the two backward kernels.
# The gather is fused: every kernel reads K/V rows of chunk indices[b, n, i] straight from k_mem/v_mem.
# dK/dV use an inverted index (per memory chunk, the (query chunk, slot) pairs that retrieved it,
# sorted on device), so every dK/dV row is written once by one program: deterministic, no atomics.

_LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class GCABlockSizes:
  """Tiling and launch settings of the three GCA kernels.

  block_q: query rows per tile (all kernels); clipped to chunk_len. Keys are never tiled: a
    memory chunk (mem_len <= 128 rows) is one tile.
  num_warps, num_stages: forward kernel ("flash_gca_fwd"), one program per (query block, head).
  num_warps_dq, num_stages_dq: dQ/dw kernel ("flash_gca_bwd_dq"), same grid as the forward.
  num_warps_dkv, num_stages_dkv: dK/dV kernel ("flash_gca_bwd_dkdv"), one program per
    (memory chunk, kv head), looping over the query chunks that retrieved it.
  """
  block_q: int = 64
  num_warps: int = 4
  num_stages: int = 2
  num_warps_dq: int = 4
  num_stages_dq: int = 2
  num_warps_dkv: int = 4
  num_stages_dkv: int = 2

  def __post_init__(self):
    if self.block_q < 16 or self.block_q & (self.block_q - 1):
      raise ValueError(f"block_q={self.block_q} must be a power of two >= 16")
    for name in ("num_warps", "num_warps_dq", "num_warps_dkv"):
      value = getattr(self, name)
      if value not in (1, 2, 4, 8, 16):
        raise ValueError(f"{name}={value} must be one of 1, 2, 4, 8, 16")
    for name in ("num_stages", "num_stages_dq", "num_stages_dkv"):
      value = getattr(self, name)
      if not 1 <= value <= 8:
        raise ValueError(f"{name}={value} must be in [1, 8]")


# Keyed on the major compute capability. Hopper: measured at the paper's shape on an H100
# (bench/gca.py, docs/benchmarks.md): two pipeline stages for the forward and dQ kernels, one for
# dK/dV; 8 warps or 32-row query blocks are slower.
# Ampere: not measured; the same tiles (K/V 64 x 64 bf16, 8 KB each a stage) fit well inside the
# 164 KB of shared memory an A100 block may use.
_TUNED = {
    9: GCABlockSizes(num_stages_dkv=1),
    8: GCABlockSizes(),
}


def default_block_sizes(dtype, mem_len: int, head_dim: int) -> GCABlockSizes:
  """Block sizes for the local device: the tuned table, shrunk where tiles get large."""
  device = jax.devices()[0]
  major = int(float(getattr(device, "compute_capability", "0") or 0))
  tile_bytes = mem_len * head_dim * jnp.dtype(dtype).itemsize  # one K (or V) tile
  if tile_bytes <= 64 * 64 * 2:
    return _TUNED.get(major, GCABlockSizes())
  # 128-row chunks, head_dim 128 or f32: K and V tiles reach 2 x 64 KB (f32), so one stage and
  # smaller query blocks aim to keep a block under the 164 KB of shared memory an A100 allows
  # (an estimate: these settings were compiled and checked on an H100 only), and 8 warps hold the
  # f32 [mem_len, head_dim] accumulators.
  return GCABlockSizes(block_q=32 if tile_bytes <= 32 * 1024 else 16, num_warps=8, num_stages=1,
                       num_warps_dq=8, num_stages_dq=1, num_warps_dkv=8, num_stages_dkv=1)


@dataclasses.dataclass(frozen=True)
class KernelSettings:
  """Hashable static settings shared by the jitted forward and backward of a GCA kernel pair
  (block_sizes: that family's own block-size type)."""
  scale: float
  num_keys: int
  softmax_off_by_one: bool
  block_sizes: Any
  interpret: bool


def _dot(a, b, *, trans_a=False, trans_b=False):
  """a @ b with f32 accumulation; f32 operands use exact f32 (Triton's default would be TF32)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _logits(q, k_tile, *, scale, num_keys):
  """Base-2 logits [block_q, mem_len] of one tile, keys past num_keys masked."""
  s = _dot(q, k_tile, trans_b=True) * (scale * _LOG2E)
  if num_keys < k_tile.shape[0]:
    key = lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(key < num_keys, s, -jnp.inf)
  return s


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, w_ref, o_ref, lse_ref, *, scale, num_keys,
                softmax_off_by_one, block_q, group):
  """One program: block_q rows of one query chunk, one head, all k slots.

  q_ref [batch, chunks, chunk_len, heads, head_dim]; k_ref, v_ref [batch, mem_chunks, mem_len,
  kv_heads, head_dim]; idx_ref, w_ref [batch, chunks, k]; o_ref like q_ref;
  lse_ref [batch, chunks, heads, k, chunk_len] (base-2 log-sum-exp of each slot's logits).
  """
  h, qb, n, b = (pl.program_id(axis) for axis in range(4))
  rows = pl.ds(qb * block_q, block_q)
  kvh = h // group
  q = q_ref[b, n, rows, h, :]

  def slot(i, acc):
    m = idx_ref[b, n, i]
    w = w_ref[b, n, i].astype(jnp.float32)
    v_tile = v_ref[b, m, :, kvh, :]
    s = _logits(q, k_ref[b, m, :, kvh, :], scale=scale, num_keys=num_keys)
    row_max = jnp.max(s, axis=1)
    if softmax_off_by_one:  # the virtual key of logit 0 enters max and sum
      row_max = jnp.maximum(row_max, 0.0)
    p = jnp.exp2(s - row_max[:, None])
    denom = jnp.sum(p, axis=1)
    if softmax_off_by_one:
      denom = denom + jnp.exp2(-row_max)
    lse_ref[b, n, h, i, rows] = row_max + jnp.log2(denom)
    o = _dot(p.astype(v_tile.dtype), v_tile)
    return acc + o * (w / denom)[:, None]

  acc = lax.fori_loop(0, idx_ref.shape[2], slot, jnp.zeros(q.shape, jnp.float32))
  o_ref[b, n, rows, h, :] = acc.astype(o_ref.dtype)


def _tile_grads(q, do, k_tile, v_tile, lse, w, *, scale, num_keys):
  """P, dS (both including the weight w) and D of one tile; see docs/specification.md §3.3.

  Returns (w * P, w * dS, D) with dS = P * (dP - D), dP = dO V^T, D = rowsum(P * dP); all f32.
  """
  p = jnp.exp2(_logits(q, k_tile, scale=scale, num_keys=num_keys) - lse[:, None])
  dp = _dot(do, v_tile, trans_b=True)
  d = jnp.sum(p * dp, axis=1)
  return p * w, p * (dp - d[:, None]) * w, d


def _dq_kernel(q_ref, k_ref, v_ref, idx_ref, w_ref, do_ref, lse_ref, dq_ref, dw_ref, *, scale,
               num_keys, block_q, group):
  """dQ and the per-(head, row block) parts of dw; same grid and refs as _fwd_kernel.

  dw_ref [batch, chunks, heads, chunk_len // block_q, k_pow2]: slot i gets sum over rows of D_i,
  for every slot (a weight-0 slot still has a weight gradient).
  """
  h, qb, n, b = (pl.program_id(axis) for axis in range(4))
  rows = pl.ds(qb * block_q, block_q)
  kvh = h // group
  q = q_ref[b, n, rows, h, :]
  do = do_ref[b, n, rows, h, :]
  slots = lax.broadcasted_iota(jnp.int32, (dw_ref.shape[4],), 0)

  def slot(i, carry):
    dq, dw = carry
    m = idx_ref[b, n, i]
    k_tile = k_ref[b, m, :, kvh, :]
    _, ds, d = _tile_grads(q, do, k_tile, v_ref[b, m, :, kvh, :], lse_ref[b, n, h, i, rows],
                           w_ref[b, n, i].astype(jnp.float32), scale=scale, num_keys=num_keys)
    dq = dq + _dot(ds.astype(k_tile.dtype), k_tile)
    return dq, jnp.where(slots == i, jnp.sum(d), dw)

  dq, dw = lax.fori_loop(0, idx_ref.shape[2], slot,
                         (jnp.zeros(q.shape, jnp.float32), jnp.zeros(slots.shape, jnp.float32)))
  dq_ref[b, n, rows, h, :] = (dq * scale).astype(dq_ref.dtype)
  dw_ref[b, n, h, qb, :] = dw


def _dkdv_kernel(q_ref, k_ref, v_ref, w_ref, do_ref, lse_ref, order_ref, starts_ref, dk_ref,
                 dv_ref, *, scale, num_keys, block_q, group):
  """dK, dV of one (memory chunk, kv head): a loop over the (query chunk, slot) pairs retrieving it.

  order_ref [batch, chunks * k]: flat slot ids n * k + i, sorted by retrieved chunk;
  starts_ref [batch, mem_chunks + 1]: chunk m's pairs are order[starts[m]:starts[m + 1]].
  Weight-0 slots are sorted past the last chunk, so they cost nothing here.
  dk_ref, dv_ref like k_ref.
  """
  kvh, b, m = (pl.program_id(axis) for axis in range(3))
  k_tile = k_ref[b, m, :, kvh, :]
  v_tile = v_ref[b, m, :, kvh, :]
  num_slots = w_ref.shape[2]
  steps = group * (q_ref.shape[2] // block_q)  # (query head of the group, row block) pairs

  def pair(e, carry):
    flat = order_ref[b, e]
    n, i = lax.div(flat, num_slots), lax.rem(flat, num_slots)  # ids are >= 0: C division is exact
    w = w_ref[b, n, i].astype(jnp.float32)

    def step(j, carry):
      dk, dv = carry
      h = kvh * group + lax.rem(j, group)
      rows = pl.ds(lax.div(j, group) * block_q, block_q)
      q = q_ref[b, n, rows, h, :]
      do = do_ref[b, n, rows, h, :]
      wp, ds, _ = _tile_grads(q, do, k_tile, v_tile, lse_ref[b, n, h, i, rows], w, scale=scale,
                              num_keys=num_keys)
      dv = dv + _dot(wp.astype(do.dtype), do, trans_a=True)
      dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
      return dk, dv

    return lax.fori_loop(0, steps, step, carry)

  zeros = jnp.zeros(k_tile.shape, jnp.float32)
  dk, dv = lax.fori_loop(starts_ref[b, m], starts_ref[b, m + 1], pair, (zeros, zeros))
  dk_ref[b, m, :, kvh, :] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[b, m, :, kvh, :] = dv.astype(dv_ref.dtype)


def _block_q(st: KernelSettings, chunk_len: int) -> int:
  return min(st.block_sizes.block_q, chunk_len)


def _row_grid(q, st):
  """(heads, row blocks, chunks, batch): the first axis varies fastest on launch, so the heads of
  one GQA group run side by side and share their K/V tiles in L2."""
  batch, chunks, chunk_len, heads, _ = q.shape
  return heads, chunk_len // _block_q(st, chunk_len), chunks, batch


@functools.partial(jax.jit, static_argnames=("st",))
def _gca_fwd_call(q, k_mem, v_mem, indices, weights, st: KernelSettings):
  batch, chunks, chunk_len, heads, _ = q.shape
  bs = st.block_sizes
  kernel = functools.partial(_fwd_kernel, scale=st.scale, num_keys=st.num_keys,
                             softmax_off_by_one=st.softmax_off_by_one,
                             block_q=_block_q(st, chunk_len), group=heads // k_mem.shape[3])
  lse_shape = (batch, chunks, heads, indices.shape[2], chunk_len)
  return pl.pallas_call(
      kernel, grid=_row_grid(q, st),
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(lse_shape, jnp.float32)),
      compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=st.interpret, name="flash_gca_fwd",
  )(q, k_mem, v_mem, indices, weights)


def retrievers(indices, weights, mem_chunks):
  """Inverted index: order [batch, chunks * k] of flat slot ids sorted by the chunk they retrieve
  (weight-0 slots last), and starts [batch, mem_chunks + 1] delimiting each chunk's run.

  starts come from a histogram and a cumulative sum rather than a search: XLA runs
  jnp.searchsorted's default method as a while loop, which on GPU syncs with the host every step.
  """
  batch = indices.shape[0]
  key = jnp.where(weights != 0, indices, mem_chunks).reshape(batch, -1)
  order = jnp.argsort(key, axis=1, stable=True)
  counts = jnp.zeros((batch, mem_chunks + 1), jnp.int32).at[
      jnp.arange(batch)[:, None], key].add(1)
  starts = jnp.cumsum(counts, axis=1) - counts  # exclusive: entries with a smaller key
  return order.astype(jnp.int32), starts.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("st",))
def _gca_bwd_call(q, k_mem, v_mem, indices, weights, lse, do, st: KernelSettings):
  batch, chunks, chunk_len, heads, _ = q.shape
  _, mem_chunks, _, kv_heads, _ = k_mem.shape
  num_slots = indices.shape[2]
  bs = st.block_sizes
  block_q = _block_q(st, chunk_len)
  common = dict(scale=st.scale, num_keys=st.num_keys, block_q=block_q, group=heads // kv_heads)
  dw_shape = (batch, chunks, heads, chunk_len // block_q, pl.next_power_of_2(num_slots))
  dq, dw = pl.pallas_call(
      functools.partial(_dq_kernel, **common), grid=_row_grid(q, st),
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(dw_shape, jnp.float32)),
      compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps_dq,
                                              num_stages=bs.num_stages_dq),
      interpret=st.interpret, name="flash_gca_bwd_dq",
  )(q, k_mem, v_mem, indices, weights, do, lse)
  order, starts = retrievers(indices, weights, mem_chunks)
  dk, dv = pl.pallas_call(
      # Early chunks are retrieved most often (causal retrieval); chunk-major order starts their
      # long loops first so they do not trail at the end of the launch.
      functools.partial(_dkdv_kernel, **common), grid=(kv_heads, batch, mem_chunks),
      out_shape=(jax.ShapeDtypeStruct(k_mem.shape, k_mem.dtype),
                 jax.ShapeDtypeStruct(v_mem.shape, v_mem.dtype)),
      compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps_dkv,
                                              num_stages=bs.num_stages_dkv),
      interpret=st.interpret, name="flash_gca_bwd_dkdv",
  )(q, k_mem, v_mem, weights, do, lse, order, starts)
  dw = jnp.sum(dw, axis=(2, 3))[:, :, :num_slots]
  return dq, dk, dv, dw.astype(weights.dtype)


def differentiable(fwd_call, bwd_call):
  """GCA over a kernel pair as a custom-VJP function of (q, k_mem, v_mem, indices, weights, *,
  scale, num_keys, softmax_off_by_one, block_sizes, interpret) for inputs already checked; the
  Triton kernels here and the Mosaic GPU ones (gca_mosaic.py) share it.

  fwd_call(q, k_mem, v_mem, indices, weights, st) -> (out, lse);
  bwd_call(q, k_mem, v_mem, indices, weights, lse, do, st) -> (dq, dk_mem, dv_mem, dweights);
  st: KernelSettings. Indices outside [0, mem_chunks) are clipped, as gca_reference's gather
  does; they get no gradient.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def attention(q, k_mem, v_mem, indices, weights, st):
    return fwd_call(q, k_mem, v_mem, indices, weights, st)[0]

  def forward(q, k_mem, v_mem, indices, weights, st):
    out, lse = fwd_call(q, k_mem, v_mem, indices, weights, st)
    return out, (q, k_mem, v_mem, indices, weights, lse)

  def backward(st, residuals, do):
    dq, dk, dv, dw = bwd_call(*residuals, do, st)
    return dq, dk, dv, None, dw

  attention.defvjp(forward, backward)

  def run(q, k_mem, v_mem, indices, weights, *, scale, num_keys, softmax_off_by_one,
          block_sizes, interpret):
    st = KernelSettings(scale=float(scale), num_keys=int(num_keys),
                        softmax_off_by_one=bool(softmax_off_by_one), block_sizes=block_sizes,
                        interpret=bool(interpret))
    indices = jnp.clip(indices.astype(jnp.int32), 0, k_mem.shape[1] - 1)
    return attention(q, k_mem, v_mem, indices, weights, st)
  return run


_gca = differentiable(_gca_fwd_call, _gca_bwd_call)


def _kernel_limits(chunk_len: int, mem_len: int, head_dim: int, dtype, mem_dtype) -> str | None:
  """What the kernels' tiles cannot hold (gca_reference can), in one line, or None."""
  for name, value, top in (("chunk_len", chunk_len, 128), ("mem_len", mem_len, 128),
                           ("head_dim", head_dim, 256)):
    if value < 16 or value > top or value & (value - 1):
      return f"{name}={value} must be a power of two in [16, {top}]"
  if dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return f"q dtype {dtype} must be bfloat16, float16 or float32"
  if mem_dtype != dtype:
    return f"k_mem/v_mem dtype {mem_dtype} must equal q dtype {dtype}"
  return None


def unsupported_reason(q, k_mem, v_mem, indices, weights, **settings) -> str | None:
  """Why `gca` cannot run these inputs (one line), or None. Takes gca's arguments; none of its
  settings limits the kernels."""
  return _kernel_limits(q.shape[2], k_mem.shape[2], q.shape[4], q.dtype, k_mem.dtype)


def _check_kernel_shapes(q, k_mem, block_sizes):
  reason = _kernel_limits(q.shape[2], k_mem.shape[2], q.shape[4], q.dtype, k_mem.dtype)
  if reason is not None:
    raise ValueError(reason)
  if block_sizes is not None and not isinstance(block_sizes, GCABlockSizes):
    raise ValueError(f"block_sizes={block_sizes!r} must be a GCABlockSizes or None")


def gca(q, k_mem, v_mem, indices, weights, *, scale: float, num_keys: int | None = None,
        softmax_off_by_one: bool = False, block_sizes: GCABlockSizes | None = None,
        interpret: bool = False) -> jax.Array:
  """FlashGCA: gca_reference's function as fused Pallas kernels, differentiable.

  Args: as gca_reference (q [batch, chunks, chunk_len, heads, head_dim]; k_mem, v_mem [batch,
    mem_chunks, mem_len, kv_heads, head_dim]; indices, weights [batch, chunks, k]), plus
    block_sizes: tiling; None picks default_block_sizes for the local device.
    interpret: run the kernels in the Pallas interpreter (CPU tests).
  chunk_len, mem_len: powers of two in [16, 128]; head_dim a power of two in [16, 256]; q, k_mem
  and v_mem share one dtype (bf16, f16 or f32), accumulation is f32. Indices outside
  [0, mem_chunks) are clipped, as gca_reference's gather does. Gradients flow to q, k_mem, v_mem
  and weights (indices get none).
  Returns:
    [batch, chunks, chunk_len, heads, head_dim] in q's dtype.
  """
  num_keys = k_mem.shape[2] if num_keys is None else num_keys
  check_gca_inputs(q, k_mem, v_mem, indices, weights, num_keys)
  _check_kernel_shapes(q, k_mem, block_sizes)
  if block_sizes is None:
    block_sizes = default_block_sizes(q.dtype, k_mem.shape[2], q.shape[4])
  return _gca(q, k_mem, v_mem, indices, weights, scale=scale, num_keys=num_keys,
              softmax_off_by_one=softmax_off_by_one, block_sizes=block_sizes, interpret=interpret)


def check_decode_inputs(q, indices, weights):
  if q.ndim != 4 or indices.ndim != 2 or indices.shape != weights.shape:
    raise ValueError(f"q {q.shape}, indices {indices.shape}, weights {weights.shape}: expected q "
                     "[batch, rows, heads, head_dim] and indices/weights [batch, k]")
  if q.shape[1] < 1:
    raise ValueError(f"rows={q.shape[1]} must be >= 1")


def gca_decode_reference(q, k_mem, v_mem, indices, weights, *, scale: float,
                         num_keys: int | None = None, softmax_off_by_one: bool = False):
  """gca_reference for a few query rows per sequence, all retrieving the same k chunks.

  q [batch, rows, heads, head_dim]; k_mem, v_mem [batch, mem_chunks, mem_len, kv_heads, head_dim];
  indices, weights [batch, k]. Returns [batch, rows, heads, head_dim].
  """
  check_decode_inputs(q, indices, weights)
  return gca_reference(q[:, None], k_mem, v_mem, indices[:, None], weights[:, None], scale=scale,
                       num_keys=num_keys, softmax_off_by_one=softmax_off_by_one)[:, 0]


def _decode_rows(rows: int) -> int:
  # The rows form one query chunk padded to the smallest tile a Triton dot takes.
  return max(16, pl.next_power_of_2(rows))


def decode_unsupported_reason(q, k_mem, v_mem, indices, weights, **settings) -> str | None:
  """Why `gca_decode` cannot run these inputs (one line), or None. Takes gca_decode's arguments."""
  if q.shape[1] > 128:
    return f"rows={q.shape[1]} must be <= 128 (one query tile)"
  return _kernel_limits(_decode_rows(q.shape[1]), k_mem.shape[2], q.shape[3], q.dtype,
                        k_mem.dtype)


def gca_decode(q, k_mem, v_mem, indices, weights, *, scale: float, num_keys: int | None = None,
               softmax_off_by_one: bool = False, block_sizes: GCABlockSizes | None = None,
               interpret: bool = False) -> jax.Array:
  """FlashGCA for decoding: gca_decode_reference's function through the gca kernels.

  The rows form one query chunk, zero-padded to a power of two >= 16 (the smallest tile a
  Triton dot takes); padded rows are computed and dropped.
  q [batch, rows, heads, head_dim], rows in [1, 128]; indices, weights [batch, k].
  Returns [batch, rows, heads, head_dim].
  """
  check_decode_inputs(q, indices, weights)
  if q.shape[1] > 128:
    raise ValueError(decode_unsupported_reason(q, k_mem, v_mem, indices, weights))
  rows = q.shape[1]
  padded = _decode_rows(rows)
  q = jnp.pad(q, ((0, 0), (0, padded - rows), (0, 0), (0, 0)))
  out = gca(q[:, None], k_mem, v_mem, indices[:, None], weights[:, None], scale=scale,
            num_keys=num_keys, softmax_off_by_one=softmax_off_by_one, block_sizes=block_sizes,
            interpret=interpret)
  return out[:, 0, :rows]
