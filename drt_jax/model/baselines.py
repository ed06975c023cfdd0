"""The baselines without retrieval: a stack of decoder blocks over the raw tokens.

"swa": sliding-window attention with ALiBi, the paper's BaseLM (§5 slide_window_lm; its "+2
layers" variant is just more decoder_layers). "full": full causal attention with RoPE, the upper
bound at short context (cuDNN's fused kernel in bf16 on a GPU unless impl="xla",
attention_impls.py).
"""

import functools

import flax.linen as nn

from drt_jax.config import ConfigError, ModelConfig
from drt_jax.model import layers
from drt_jax.model.architectures import Architecture
from drt_jax.model.attention import SelfAttention
from drt_jax.model.blocks import DecoderBlock
from drt_jax.model.drt import maybe_remat, token_embedding


class CausalLM(nn.Module):
  """tokens int [batch, T] -> final-normed hidden float32 [batch, T, d]; sum(decoder_layers)
  blocks whose self-attention is sliding-window (arch "swa") or full causal (arch "full").

  Decoding (inference.CachedDecoder) applies the same stage methods to a CausalLM built with
  mode="step" or "segment": the self-attention layers then keep a KV cache (collection "cache";
  attention.SelfAttention), a ring of the last window + 1 positions for "swa" and cache_len for
  "full".
  """
  config: ModelConfig
  mode: str = "train"  # attention.MODES
  history: int = 0  # mode "segment", "swa": cached positions a segment attends to
  cache_len: int = 0  # decoding "full": the most positions a sequence holds

  def setup(self):
    c = self.config
    attention = functools.partial(SelfAttention, kind="full" if c.arch == "full" else "sliding",
                                  mode=self.mode, history=self.history, cache_len=self.cache_len)
    block = maybe_remat(c, DecoderBlock, self.mode)
    self.embed = token_embedding(c)
    self.layer = [block(c, attention) for _ in range(sum(c.decoder_layers))]
    self.final_norm = layers.RMSNorm(c.rms_eps)

  def __call__(self, tokens, *, train: bool = False):
    del train  # no stochastic parts
    return self.finish(self.blocks(self.token_rows(tokens)))

  def token_rows(self, tokens):
    """int [b, t] -> float32 [b, t, d]."""
    return self.embed(tokens)

  def blocks(self, x):
    """Every decoder block over rows [b, t, d] -> [b, t, d]."""
    for block in self.layer:
      x = block(x)
    return x

  def finish(self, x):
    """The final RMSNorm -> float32."""
    return self.final_norm(x)


def _validate_full(config: ModelConfig):
  if config.use_alibi:
    raise ConfigError("model.use_alibi=True: model.arch='full' uses RoPE (model.rope_theta; "
                      "cuDNN's fused attention takes ALiBi only as a dense bias); set "
                      "model.use_alibi=False")


def _decoder(config: ModelConfig, params, **options):
  from drt_jax import inference  # it builds on the model modules

  return inference.CachedDecoder(config, params, **options)


ARCHITECTURES = {
    "swa": Architecture(name="swa", module=CausalLM, decoder=_decoder),
    "full": Architecture(name="full", module=CausalLM, decoder=_decoder, validate=_validate_full),
}
