"""The bidirectional chunk encoder: landmark keys and chunk K/V memory from the lower layers (§2.4)."""

import flax.linen as nn

from drt_jax.config import ModelConfig
from drt_jax.model import attention
from drt_jax.model import layers


class EncoderBlock(nn.Module):
  """Pre-norm block with full attention inside a chunk and RoPE. [b, n, S, d_model] -> float32."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = layers.RMSNorm(c.encoder_rms_eps, name="attn_norm")(x)
    q = layers.apply_rope(layers.head_projection(c, c.num_heads, "q")(h), c.rope_theta)
    k = layers.apply_rope(layers.head_projection(c, c.num_heads, "k")(h), c.rope_theta)
    v = layers.head_projection(c, c.num_heads, "v")(h)
    attended = attention.chunk_attention(q, k, v, scale=c.head_dim ** -0.5, impl=c.impl)
    x = x + layers.output_projection(c, "o")(attended)
    return x + layers.SwiGLU(c, name="mlp")(layers.RMSNorm(c.encoder_rms_eps, name="mlp_norm")(x))


class ChunkMemory(nn.Module):
  """Encodes every chunk of the lower-layer output on its own.

  Input: hidden [batch, chunks, S, d_model] (S = chunk_len + 1, landmark last).
  Returns:
    landmark_keys: float32 [batch, chunks, d_model], the encoder output at the landmark row.
    k_mem, v_mem: [batch, chunks, S, heads, head_dim] in the compute dtype, shared by every upper
      layer and group. The landmark row is kept; GCA masks it (`num_keys = S - 1`).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, hidden):
    c = self.config
    # Chunks keep their batch row ([b, n, S, d]), so the attention kernel runs per batch shard.
    x = layers.RMSNorm(c.rms_eps, name="enc_prenorm")(hidden)
    block = nn.remat(EncoderBlock) if c.remat else EncoderBlock
    for i in range(c.encoder_layers):
      x = block(c, name=f"block_{i}")(x)
    encoded = layers.RMSNorm(c.encoder_rms_eps, name="final_norm")(x)
    k_mem = layers.head_projection(c, c.num_heads, "chunk_k")(encoded)
    v_mem = layers.head_projection(c, c.num_heads, "chunk_v")(encoded)
    return encoded[:, :, -1, :], k_mem, v_mem
