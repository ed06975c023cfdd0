"""The sliding-window baseline (§5 slide_window_lm): the lower blocks only, no landmarks or retrieval."""

import flax.linen as nn

from drt_jax.config import ModelConfig
from drt_jax.model import layers
from drt_jax.model.blocks import DecoderBlock
from drt_jax.model.drt import maybe_remat, token_embedding


class SlidingWindowLM(nn.Module):
  """tokens int [batch, T] -> final-normed hidden float32 [batch, T, d]; sum(decoder_layers) blocks."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    del train  # no stochastic parts
    c = self.config
    x = token_embedding(c)(tokens)
    for i in range(sum(c.decoder_layers)):
      x = maybe_remat(c, DecoderBlock)(c, name=f"layer_{i}")(x)
    return layers.RMSNorm(c.rms_eps, name="final_norm")(x)
