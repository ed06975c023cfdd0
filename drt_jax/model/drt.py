"""The full DRT (§2): landmarks, lower layers, chunk memory, G retrieval groups of upper layers."""

import flax.linen as nn
import jax.numpy as jnp

from drt_jax.config import ModelConfig
from drt_jax.model import layers
from drt_jax.model import retrieval as retrieval_ops
from drt_jax.model.blocks import DecoderBlock, UpperBlock
from drt_jax.model.encoder import ChunkMemory


def token_embedding(config: ModelConfig) -> nn.Embed:
  """The tied embedding table [vocab, d_model], float32 (§2.2)."""
  return nn.Embed(config.vocab_size, config.d_model, dtype=jnp.float32, param_dtype=jnp.float32,
                  embedding_init=layers.normal_init(config, ("vocab", "embed")), name="embed")


def insert_landmarks(x, landmark):
  """Token rows [batch, chunks, chunk_len, d] -> [batch, chunks * S, d], the landmark vector [d]
  after every chunk (§1.2)."""
  batch, chunks, _, d_model = x.shape
  x = jnp.concatenate([x, jnp.broadcast_to(landmark, (batch, chunks, 1, d_model))], axis=2)
  return x.reshape(batch, -1, d_model)


def drop_landmarks(x, chunk_size: int):
  """[batch, chunks * S, d] -> [batch, chunks * (S - 1), d]: row t belongs to raw token t."""
  batch, _, d_model = x.shape
  return x.reshape(batch, -1, chunk_size, d_model)[:, :, :-1].reshape(batch, -1, d_model)


def maybe_remat(config: ModelConfig, module_class, static_argnums: tuple[int, ...] = ()):
  """module_class under remat when config.remat; static_argnums as nn.remat's (self is 0)."""
  return nn.remat(module_class, static_argnums=static_argnums) if config.remat else module_class


class DRT(nn.Module):
  """tokens int [batch, T] (T a multiple of chunk_len) -> final-normed hidden float32 [batch, T, d].

  The landmark rows are inserted after every chunk_len tokens and removed again at the end, so
  output row t belongs to raw token t. The landmark is a learned vector, not a vocabulary row.
  Each group's retrieval is sown as intermediates "retrieval_<g>" (indices/weights/valid of the
  chunk it was computed at, before the shift to the chunk it serves).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    c = self.config
    batch, length = tokens.shape
    if length % c.chunk_len:
      raise ValueError(f"sequence length {length} must be a multiple of model.chunk_len={c.chunk_len}")
    chunks, size, d_model = length // c.chunk_len, c.chunk_size, c.d_model

    x = token_embedding(c)(tokens).reshape(batch, chunks, c.chunk_len, d_model)
    landmark = self.param("landmark", layers.normal_init(c, ("embed",)), (d_model,), jnp.float32)
    x = insert_landmarks(x, landmark)

    for i in range(c.decoder_layers[0]):
      x = maybe_remat(c, DecoderBlock)(c, name=f"lower_{i}")(x)
    landmark_keys, k_mem, v_mem = ChunkMemory(c, name="memory")(x.reshape(batch, chunks, size, -1))

    for g, num_layers in enumerate(c.decoder_layers[1:]):
      queries = layers.RMSNorm(c.rms_eps, name=f"lmk_norm_{g}")(
          x.reshape(batch, chunks, size, d_model)[:, :, -1])
      selected = self.retrieve(queries, landmark_keys, train=train)
      self.sow("intermediates", f"retrieval_{g}", selected)
      serving = retrieval_ops.shift_to_next_chunk(selected)
      for i in range(num_layers):
        x = maybe_remat(c, UpperBlock)(c, name=f"group_{g}_{i}")(x, k_mem, v_mem, serving)

    return drop_landmarks(layers.RMSNorm(c.rms_eps, name="final_norm")(x), size)

  def retrieve(self, queries, landmark_keys, *, train: bool) -> retrieval_ops.Retrieval:
    """Top-k earlier chunks per chunk (§2.5). queries, keys [batch, chunks, d] -> [batch, chunks, k]."""
    c = self.config
    scores = retrieval_ops.chunk_scores(queries, landmark_keys)
    mask = retrieval_ops.causal_chunk_mask(jnp.arange(scores.shape[1]), jnp.arange(scores.shape[2]))
    ranking = None
    if c.retrieval == "random":
      ranking = retrieval_ops.gumbel_noise(self.make_rng("gumbel"), scores.shape)
    elif train and c.gumbel:
      ranking = scores + retrieval_ops.gumbel_noise(self.make_rng("gumbel"), scores.shape)
    return retrieval_ops.select_chunks(scores, mask, c.topk, ranking)
