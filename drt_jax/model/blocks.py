"""Decoder blocks: the lower (and baseline) block and the upper block with GCA (§2.3, §2.6)."""

from typing import Callable

import flax.linen as nn

from drt_jax.config import ModelConfig
from drt_jax.model import layers
from drt_jax.model.attention import SelfAttention
from drt_jax.model.gca import GroupedCrossAttention
from drt_jax.model.retrieval import Retrieval

ACTIVATION_AXES = ("batch", "length", "embed")


class DecoderBlock(nn.Module):
  """x + Attn(norm(x)), then + MLP(norm(x)). float32 [batch, length, d_model] -> same."""
  config: ModelConfig
  # The self-attention class, e.g. SelfAttention with a kind and a decoding mode set (same params
  # in every mode).
  attention: Callable[..., nn.Module] = SelfAttention

  @nn.compact
  def __call__(self, x, *attention_args):
    # attention_args go on to the attention layer, e.g. landmark attention's top-k.
    c = self.config
    x = x + self.attention(c, name="attn")(layers.RMSNorm(c.rms_eps, name="attn_norm")(x),
                                           *attention_args)
    x = x + layers.SwiGLU(c, name="mlp")(layers.RMSNorm(c.rms_eps, name="mlp_norm")(x))
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


class UpperBlock(nn.Module):
  """Self-attention, GCA and MLP. float32 [batch, chunks * S, d_model] -> same.

  residual="reference": a = x + Attn; out = a + MLP(norm(a + GCA(a))) (the GCA result only
  feeds the MLP input, as in the reference code). residual="standard": a' = a + GCA(a);
  out = a' + MLP(norm(a')).
  x holds whole chunks ([batch, chunks * S, d_model]) or, when decoding, one row per sequence
  ([batch, 1, d_model], retrieval [batch, 1, k]); k_mem may then hold only the retrieved chunks.
  """
  config: ModelConfig
  attention: Callable[..., nn.Module] = SelfAttention  # as in DecoderBlock

  @nn.compact
  def __call__(self, x, k_mem, v_mem, retrieval: Retrieval):
    c = self.config
    a = x + self.attention(c, name="attn")(layers.RMSNorm(c.rms_eps, name="attn_norm")(x))
    chunked = a.reshape(retrieval.indices.shape[:2] + (-1, c.d_model))
    r = GroupedCrossAttention(c, name="gca")(chunked, k_mem, v_mem, retrieval).reshape(a.shape)
    mixed = a + r
    base = a if c.residual == "reference" else mixed
    out = base + layers.SwiGLU(c, name="mlp")(layers.RMSNorm(c.rms_eps, name="mlp_norm")(mixed))
    return nn.with_logical_constraint(out, ACTIVATION_AXES)
