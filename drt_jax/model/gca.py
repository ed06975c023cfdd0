"""The GCA sub-layer of an upper block (§2.6): queries from this layer, K/V from the shared memory."""

import flax.linen as nn

from drt_jax.config import ModelConfig
from drt_jax.model import attention
from drt_jax.model import layers
from drt_jax.model.retrieval import Retrieval


class GroupedCrossAttention(nn.Module):
  """Every row of chunk j (landmark included) attends to chunk j's retrieved chunks.

  x: [batch, chunks, S, d_model]; k_mem, v_mem: [batch, chunks, S, heads, head_dim];
  retrieval: per query chunk (already shifted to the chunk it serves), [batch, chunks, k].
  Returns the compute dtype [batch, chunks, S, d_model]; zero for chunks with no valid slot.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x, k_mem, v_mem, retrieval: Retrieval):
    c = self.config
    h = layers.RMSNorm(c.rms_eps, name="pre_norm")(x)
    q = layers.head_projection(c, c.num_heads, "q")(h)
    out = attention.grouped_cross_attention(
        q, k_mem, v_mem, retrieval.indices, retrieval.weights, scale=c.head_dim ** -0.5,
        num_keys=c.chunk_size - 1, softmax_off_by_one=c.softmax_off_by_one, impl=c.impl)
    return layers.output_projection(c, "o")(out)
