"""The one dispatch point for attention kernels (`model.impl`: "xla" | "pallas"), and the
sliding-window self-attention layer built on it (§2.3).

"xla" runs the plain-JAX references of kernels_pallas (blockwise, O(T*W) memory); "pallas" runs
the Pallas GPU kernels with the same signatures (in interpret mode when there is no GPU). XLA
cannot partition a pallas_call, so under a multi-device mesh the kernels run per batch shard
inside `jax.shard_map`.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from drt_jax.config import ModelConfig
from drt_jax.model import layers
from kernels_pallas import gca as gca_ops
from kernels_pallas import sliding_window as sliding_window_ops

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


def _interpret() -> bool:
  return jax.default_backend() != "gpu"


@jax.named_scope("sliding_window_attention")
def sliding_window(q, k, v, slopes, *, window: int, scale: float, impl: str):
  """Causal sliding-window attention. q [b, t, heads, d], k/v [b, t, kv_heads, d] -> like q."""
  if impl != "pallas":
    return sliding_window_ops.sliding_window_reference(q, k, v, slopes, window=window, scale=scale)
  kernel = functools.partial(sliding_window_ops.sliding_window_attention, window=window,
                             scale=scale, interpret=_interpret())
  if slopes is None:
    return _per_batch_shard(kernel, (q, k, v))
  return _per_batch_shard(kernel, (q, k, v), (slopes,))


def sliding_window_decode(q, k_cache, v_cache, slopes, *, window: int, scale: float, position,
                          impl: str):
  """One new query per sequence against a ring-buffer KV cache (inference). q [b, heads, d],
  k/v_cache [b, cache_len, kv_heads, d], position int [b] -> like q."""
  settings = dict(window=window, scale=scale)
  if impl != "pallas":
    return sliding_window_ops.sliding_window_decode_reference(q, k_cache, v_cache, slopes,
                                                              position=position, **settings)

  def kernel(q, k_cache, v_cache, position, *slopes):
    return sliding_window_ops.sliding_window_decode(q, k_cache, v_cache, *slopes,
                                                    position=position, interpret=_interpret(),
                                                    **settings)
  return _per_batch_shard(kernel, (q, k_cache, v_cache, position),
                          () if slopes is None else (slopes,))


@jax.named_scope("grouped_cross_attention")
def grouped_cross_attention(q, k_mem, v_mem, indices, weights, *, scale: float, num_keys: int,
                            softmax_off_by_one: bool, impl: str):
  """GCA (kernels_pallas/gca.py). q [b, n, s, heads, d], k/v_mem [b, m, t, kv_heads, d],
  indices/weights [b, n, k] -> [b, n, s, heads, d]."""
  settings = dict(scale=scale, num_keys=num_keys, softmax_off_by_one=softmax_off_by_one)
  if impl != "pallas":
    return gca_ops.gca_reference(q, k_mem, v_mem, indices, weights, **settings)
  if q.shape[1] == 1:
    # One query chunk per sequence, e.g. a decoding step's single row: gca_decode pads the rows
    # to the smallest kernel tile.
    decode = functools.partial(gca_ops.gca_decode, interpret=_interpret(), **settings)
    out = _per_batch_shard(decode, (q[:, 0], k_mem, v_mem, indices[:, 0], weights[:, 0]))
    return out[:, None]
  kernel = functools.partial(gca_ops.gca, interpret=_interpret(), **settings)
  return _per_batch_shard(kernel, (q, k_mem, v_mem, indices, weights))


class SlidingWindowSelfAttention(nn.Module):
  """Causal window-W attention with ALiBi (§2.3). [b, t, d_model] -> compute dtype [b, t, d_model]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    q = layers.head_projection(c, c.num_heads, "q")(x)
    k = layers.head_projection(c, c.num_kv_heads, "k")(x)
    v = layers.head_projection(c, c.num_kv_heads, "v")(x)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    slopes = (jnp.asarray(sliding_window_ops.alibi_slopes(c.num_heads), jnp.float32)
              if c.use_alibi else None)
    out = sliding_window(q, k, v, slopes, window=c.window, scale=c.head_dim ** -0.5, impl=c.impl)
    return layers.output_projection(c, "o")(out)
