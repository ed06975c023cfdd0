"""The one dispatch point for attention kernels, and the decoder self-attention layer built on
it: sliding-window with ALiBi (§2.3) or full causal with RoPE, in training or over a KV cache when
decoding.

Each op asks its registry (attention_impls.py) which implementation `model.impl` ("auto" |
"mosaic" | "triton" | "xla") gives on this device, with fallbacks, and runs it. "xla" is the
plain-JAX references of kernels_pallas (blockwise, O(T*W) memory), which XLA partitions like any
program. XLA cannot partition a pallas_call (nor cuDNN's attention along the sequence), so under a
multi-device mesh every other implementation runs per batch shard inside `jax.shard_map`.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from drt_jax.config import ModelConfig
from drt_jax.model import attention_impls as impls
from drt_jax.model import layers
from kernels_pallas import sliding_window as sliding_window_ops
from kernels_pallas import sliding_window_mosaic

BATCH_AXES = ("data", "fsdp")


def _per_batch_shard(kernel, batched_args, shared_args=()):
  """Runs kernel(*batched_args, *shared_args) on each batch shard of the ambient mesh.

  batched_args lead with the batch axis (split over BATCH_AXES); shared_args are replicated.
  Training batches always split evenly (train_lib.check_batch_divisibility).
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(axis for axis in BATCH_AXES if axis in mesh.shape)
  shards = 1 if mesh.empty else math.prod(mesh.shape[axis] for axis in axes)
  # A batch that does not split evenly (the batch-1 trace that initialises params) runs whole.
  if shards == 1 or batched_args[0].shape[0] % shards:
    return kernel(*batched_args, *shared_args)
  in_specs = (P(axes),) * len(batched_args) + (P(),) * len(shared_args)
  return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=P(axes),
                       check_vma=False)(*batched_args, *shared_args)


def _run(op: impls.Op, impl: str, batched_args, shared_args=(), **settings):
  """op's implementation for model.impl=impl on these inputs, run on batched_args (leading with
  the batch axis) and shared_args (replicated), static settings as keywords."""
  name, fn = op.select(impl, *batched_args, *shared_args, **settings)
  kernel = lambda *args: fn(*args, **settings)  # noqa: E731
  if name == "xla":
    return kernel(*batched_args, *shared_args)
  return _per_batch_shard(kernel, batched_args, shared_args)


@jax.named_scope("sliding_window_attention")
def sliding_window(q, k, v, slopes, *, window: int, scale: float, impl: str):
  """Causal sliding-window attention. q [b, t, heads, d], k/v [b, t, kv_heads, d] -> like q."""
  return _run(impls.SLIDING_WINDOW, impl, (q, k, v), () if slopes is None else (slopes,),
              window=window, scale=scale)


def sliding_window_decode(q, k_cache, v_cache, slopes, *, window: int, scale: float, position,
                          impl: str):
  """One new query per sequence against a ring-buffer KV cache (inference). q [b, heads, d],
  k/v_cache [b, cache_len, kv_heads, d], position int [b] -> like q."""
  settings = dict(window=window, scale=scale)
  slopes = () if slopes is None else (slopes,)
  name, fn = impls.SLIDING_WINDOW_DECODE.select(impl, q, k_cache, v_cache, *slopes,
                                                   position=position, **settings)
  if name == "xla":
    return fn(q, k_cache, v_cache, *slopes, position=position, **settings)

  # position is per sequence: it splits with the batch, so it goes in positionally.
  def kernel(q, k_cache, v_cache, position, *slopes):
    return fn(q, k_cache, v_cache, *slopes, position=position, **settings)
  return _per_batch_shard(kernel, (q, k_cache, v_cache, position), slopes)


@jax.named_scope("causal_attention")
def causal_attention(q, k, v, *, scale: float, impl: str):
  """Full causal attention. q [b, t, heads, d], k/v [b, t, kv_heads, d] -> like q.

  On a GPU both kernel impls run cuDNN's fused kernel (jax.nn.dot_product_attention; JAX notes:
  correct only with is_causal=True) for 16-bit inputs; otherwise XLA's [t, t] softmax.
  """
  return _run(impls.CAUSAL_ATTENTION, impl, (q, k, v), scale=scale)


def cached_causal_attention(q, k_cache, v_cache, *, query_positions, scale: float):
  """Rows q [b, n, heads, d] at positions query_positions (int [b, n]) against a linear KV cache
  k/v_cache [b, L, kv_heads, d] holding position p in slot p; slots after a row's position are
  masked (decoding, any impl: XLA's masked softmax)."""
  visible = jnp.arange(k_cache.shape[1])[None, None, :] <= query_positions[:, :, None]
  return jax.nn.dot_product_attention(q, k_cache, v_cache, mask=visible[:, None], scale=scale,
                                      implementation="xla")


@jax.named_scope("grouped_cross_attention")
def grouped_cross_attention(q, k_mem, v_mem, indices, weights, *, scale: float, num_keys: int,
                            softmax_off_by_one: bool, impl: str):
  """GCA (kernels_pallas/gca.py). q [b, n, s, heads, d], k/v_mem [b, m, t, kv_heads, d],
  indices/weights [b, n, k] -> [b, n, s, heads, d]."""
  settings = dict(scale=scale, num_keys=num_keys, softmax_off_by_one=softmax_off_by_one)
  if q.shape[1] == 1:
    # One query chunk per sequence, e.g. a decoding step's single row: gca_decode pads the rows
    # to the smallest kernel tile.
    out = _run(impls.GCA_DECODE, impl, (q[:, 0], k_mem, v_mem, indices[:, 0], weights[:, 0]),
               **settings)
    return out[:, None]
  return _run(impls.GCA, impl, (q, k_mem, v_mem, indices, weights), **settings)


@jax.named_scope("chunk_attention")
def chunk_attention(q, k, v, *, scale: float, impl: str):
  """Bidirectional attention of every chunk's rows over the same chunk's rows (the chunk
  encoder, §2.4). q, k, v [b, n, s, heads, d] -> like q; softmax in float32. The kernel impls run
  it as GCA with one self-retrieval slot per chunk (attention_impls.chunk_attention_through)."""
  return _run(impls.CHUNK_ATTENTION, impl, (q, k, v), scale=scale)


def _rows_by_position(ring, first):
  """ring [b, n, ...] (position p in slot p % n) -> [b, n, ...], positions first .. first + n - 1.

  first: int [b]. Slots of positions never written hold zeros or stale rows: callers drop them.
  """
  n = ring.shape[1]
  slots = jnp.remainder(first[:, None] + jnp.arange(n)[None, :], n)
  return jnp.take_along_axis(ring, slots.reshape(slots.shape + (1,) * (ring.ndim - 2)), axis=1)


def _to_ring(chronological, end, n: int):
  """The last n rows of `chronological` [b, t, ...] (positions end - t .. end - 1) as a ring of n
  slots; rows before position end - t (t < n) are zero."""
  if chronological.shape[1] < n:
    pad = [(0, 0)] * chronological.ndim
    pad[1] = (n - chronological.shape[1], 0)
    chronological = jnp.pad(chronological, pad)
  last = chronological[:, -n:]  # positions end - n .. end - 1
  slots = jnp.remainder(jnp.arange(n)[None, :] - (end[:, None] - n), n)
  return jnp.take_along_axis(last, slots.reshape(slots.shape + (1,) * (last.ndim - 2)), axis=1)


def write_rows(cache, rows, first):
  """cache [b, L, ...] with rows [b, n, ...] written at slots first .. first + n - 1 of each
  sequence (first int [b])."""
  return jax.vmap(lambda c, r, f: jax.lax.dynamic_update_slice_in_dim(c, r, f, axis=0))(
      cache, rows, first)


# The Mosaic decode kernel streams a ring in whole steps of its default block_k slots.
RING_TILE = sliding_window_mosaic.MosaicBlockSizes().block_k


def ring_slots(window: int) -> int:
  """Slots of a sliding-window layer's decoding ring: the window + 1 positions a query sees,
  rounded up to whole RING_TILEs (the slots past window + 1 are never visible)."""
  return -(-(window + 1) // RING_TILE) * RING_TILE


MODES = ("train", "step", "segment")
KINDS = ("sliding", "full")


class SelfAttention(nn.Module):
  """Decoder self-attention. x [b, rows, d_model] -> compute dtype [b, rows, d_model].

  kind "sliding": causal window-W attention with ALiBi (§2.3); "full": full causal attention
  with RoPE (model.rope_theta) at the stream positions.
  mode "train": x holds whole sequences from position 0; no state.
  mode "step": x [b, 1, d_model], one new row per sequence, each at its own position.
  mode "segment": x [b, rows, d_model], rows continuing each sequence from its own position.
  Decoding keeps the keys/values in flax collection "cache": for "sliding" a ring of
  ring_slots(window) slots (position p in slot p % slots); a segment attends to the `history`
  cached positions before it (history = min(position, window + 1), static, so no slot never
  written is read; a sequence below that position reads unwritten slots, and the decoder keeps
  none of its results: inference.Session._pieces). For "full" a linear cache of `cache_len` slots
  (position p in slot p), masked past each row.
  """
  config: ModelConfig
  kind: str = "sliding"
  mode: str = "train"
  history: int = 0
  cache_len: int = 0  # "full" decoding: the most positions a sequence holds

  @nn.compact
  def __call__(self, x):
    c = self.config
    batch, rows, _ = x.shape
    q = layers.head_projection(c, c.num_heads, "q")(x)
    k = layers.head_projection(c, c.num_kv_heads, "k")(x)
    v = layers.head_projection(c, c.num_kv_heads, "v")(x)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    scale = c.head_dim ** -0.5
    if self.mode == "train":
      positions = jnp.broadcast_to(jnp.arange(rows), (batch, rows))
    else:
      position = self.variable("cache", "position", jnp.zeros, (batch,), jnp.int32)
      positions = position.value[:, None] + jnp.arange(rows)[None, :]
      position.value = position.value + rows
    if self.kind == "full":
      q = layers.apply_rope(q, c.rope_theta, positions)
      k = layers.apply_rope(k, c.rope_theta, positions)
      out = (causal_attention(q, k, v, scale=scale, impl=c.impl) if self.mode == "train" else
             self._cached_full(q, k, v, positions, scale))
    else:
      slopes = (jnp.asarray(sliding_window_ops.alibi_slopes(c.num_heads), jnp.float32)
                if c.use_alibi else None)
      out = (sliding_window(q, k, v, slopes, window=c.window, scale=scale, impl=c.impl)
             if self.mode == "train" else self._cached_sliding(q, k, v, positions[:, 0], slopes,
                                                               scale))
    return layers.output_projection(c, "o")(out)

  def _cache(self, size: int, k, v):
    shape = (k.shape[0], size, self.config.num_kv_heads, self.config.head_dim)
    return (self.variable("cache", "cached_k", jnp.zeros, shape, k.dtype),
            self.variable("cache", "cached_v", jnp.zeros, shape, v.dtype))

  def _cached_full(self, q, k, v, positions, scale):
    k_cache, v_cache = self._cache(self.cache_len, k, v)
    if self.mode == "step":
      slot = (jnp.arange(q.shape[0]), positions[:, 0])
      k_cache.value = k_cache.value.at[slot].set(k[:, 0])
      v_cache.value = v_cache.value.at[slot].set(v[:, 0])
    else:  # each sequence from its own position
      k_cache.value = write_rows(k_cache.value, k, positions[:, 0])
      v_cache.value = write_rows(v_cache.value, v, positions[:, 0])
    return cached_causal_attention(q, k_cache.value, v_cache.value, query_positions=positions,
                                   scale=scale)

  def _cached_sliding(self, q, k, v, p, slopes, scale):
    c = self.config
    size = ring_slots(c.window)
    k_cache, v_cache = self._cache(size, k, v)
    rows = q.shape[1]
    if self.mode == "step":
      slot = (jnp.arange(q.shape[0]), jnp.remainder(p, size))
      k_cache.value = k_cache.value.at[slot].set(k[:, 0])
      v_cache.value = v_cache.value.at[slot].set(v[:, 0])
      return sliding_window_decode(q[:, 0], k_cache.value, v_cache.value, slopes,
                                   window=c.window, scale=scale, position=p, impl=c.impl)[:, None]
    h = self.history
    past = lambda cache: _rows_by_position(cache, p - size)[:, size - h:]  # noqa: E731
    keys = jnp.concatenate([past(k_cache.value), k], axis=1)
    values = jnp.concatenate([past(v_cache.value), v], axis=1)
    # History rows get zero queries: their outputs are dropped, only their keys matter.
    queries = jnp.pad(q, ((0, 0), (h, 0), (0, 0), (0, 0)))
    out = sliding_window(queries, keys, values, slopes, window=c.window, scale=scale,
                         impl=c.impl)[:, h:]
    k_cache.value = _to_ring(keys, p + rows, size)
    v_cache.value = _to_ring(values, p + rows, size)
    return out
