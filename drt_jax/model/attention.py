"""The one dispatch point for attention kernels (`model.impl`: "xla" | "pallas"), and the
sliding-window self-attention layer built on it (§2.3).

"xla" runs the plain-JAX references of kernels_pallas (blockwise, O(T*W) memory); "pallas" runs
the Pallas GPU kernels with the same signatures.
"""

import flax.linen as nn
import jax.numpy as jnp

from drt_jax.config import ModelConfig
from drt_jax.model import layers
from kernels_pallas import gca as gca_ops
from kernels_pallas import sliding_window as sliding_window_ops


def sliding_window(q, k, v, slopes, *, window: int, scale: float, impl: str):
  """Causal sliding-window attention. q [b, t, heads, d], k/v [b, t, kv_heads, d] -> like q."""
  if impl == "pallas":
    return sliding_window_ops.sliding_window_attention(q, k, v, slopes, window=window, scale=scale)
  return sliding_window_ops.sliding_window_reference(q, k, v, slopes, window=window, scale=scale)


def grouped_cross_attention(q, k_mem, v_mem, indices, weights, *, scale: float, num_keys: int,
                            softmax_off_by_one: bool, impl: str):
  """GCA (kernels_pallas/gca.py). q [b, n, s, heads, d], k/v_mem [b, m, t, kv_heads, d],
  indices/weights [b, n, k] -> [b, n, s, heads, d]."""
  op = gca_ops.gca if impl == "pallas" else gca_ops.gca_reference
  return op(q, k_mem, v_mem, indices, weights, scale=scale, num_keys=num_keys,
            softmax_off_by_one=softmax_off_by_one)


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
