"""The full DRT (§2): landmarks, lower layers, chunk memory, G retrieval groups of upper layers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from drt_jax.config import ConfigError, ModelConfig
from drt_jax.model import layers
from drt_jax.model import retrieval as retrieval_ops
from drt_jax.model.architectures import Architecture
from drt_jax.model.attention import SelfAttention
from drt_jax.model.blocks import DecoderBlock, UpperBlock
from drt_jax.model.encoder import ChunkMemory


def token_embedding(config: ModelConfig) -> nn.Embed:
  """The tied embedding table [vocab, d_model], float32 (§2.2)."""
  return nn.Embed(config.vocab_size, config.d_model, dtype=jnp.float32, param_dtype=jnp.float32,
                  embedding_init=layers.normal_init(config, ("vocab", "embed")), name="embed")


@jax.named_scope("insert_landmarks")
def insert_landmarks(x, landmark):
  """Token rows [batch, chunks, chunk_len, d] -> [batch, chunks * S, d], the landmark vector [d]
  after every chunk (§1.2)."""
  batch, chunks, _, d_model = x.shape
  x = jnp.concatenate([x, jnp.broadcast_to(landmark, (batch, chunks, 1, d_model))], axis=2)
  return x.reshape(batch, -1, d_model)


@jax.named_scope("drop_landmarks")
def drop_landmarks(x, chunk_size: int):
  """[batch, chunks * S, d] -> [batch, chunks * (S - 1), d]: row t belongs to raw token t."""
  batch, _, d_model = x.shape
  return x.reshape(batch, -1, chunk_size, d_model)[:, :, :-1].reshape(batch, -1, d_model)


def maybe_remat(config: ModelConfig, module_class, mode: str = "train",
                static_argnums: tuple[int, ...] = ()):
  """The block class, rematerialised in the backward pass when model.remat (training only);
  static_argnums as nn.remat's (self is 0)."""
  if config.remat and mode == "train":
    return nn.remat(module_class, static_argnums=static_argnums)
  return module_class


def _check_sequence(config: ModelConfig, length: int):
  if length % config.chunk_len:
    raise ValueError(f"sequence length {length} must be a multiple of "
                     f"model.chunk_len={config.chunk_len}")


class LandmarkRows(nn.Module):
  """The input stage methods of the models whose stream has a learned landmark row after every
  chunk_len tokens: DRT and Landmark Attention (model/landmark.py). Subclasses hold `config`
  and, from setup, `embed` (token_embedding) and `landmark` (a [d] param)."""

  def chunk_rows(self, tokens):
    """int [b, n * chunk_len] from a chunk boundary -> [b, n * S, d], a landmark per chunk."""
    c = self.config
    batch, length = tokens.shape
    x = self.embed(tokens).reshape(batch, length // c.chunk_len, c.chunk_len, c.d_model)
    return insert_landmarks(x, self.landmark)

  def token_row(self, tokens):
    """int [b] -> [b, 1, d]."""
    return self.embed(tokens)[:, None]

  def landmark_row(self, batch: int):
    """[b, 1, d]: the learned landmark vector."""
    return jnp.broadcast_to(self.landmark, (batch, 1, self.config.d_model))


class DRT(LandmarkRows):
  """tokens int [batch, T] (T a multiple of chunk_len) -> final-normed hidden float32 [batch, T, d].

  The landmark rows are inserted after every chunk_len tokens and removed again at the end, so
  output row t belongs to raw token t. The landmark is a learned vector, not a vocabulary row.
  Each group's retrieval is sown as intermediates "retrieval_<g>" (indices/weights/valid of the
  chunk it was computed at, before the shift to the chunk it serves).

  __call__ composes the stage methods below; incremental decoding (inference.py) applies them
  one at a time to a DRT built with mode="step" or "segment" (attention.SelfAttention: the
  self-attention layers then keep a KV cache, collection "cache"), with the same params.
  Shapes: b batch, n chunks, S = chunk_len + 1 rows per chunk, d = d_model, m memory chunks,
  K retrieved chunks.
  """
  config: ModelConfig
  mode: str = "train"  # attention.MODES
  history: int = 0  # mode "segment": cached positions a segment attends to (SelfAttention)

  def setup(self):
    c = self.config
    attention = functools.partial(SelfAttention, kind="sliding", mode=self.mode,
                                  history=self.history)
    lower = maybe_remat(c, DecoderBlock, self.mode)
    upper = maybe_remat(c, UpperBlock, self.mode)
    self.embed = token_embedding(c)
    self.landmark = self.param("landmark", layers.normal_init(c, ("embed",)), (c.d_model,),
                               jnp.float32)
    self.lower = [lower(c, attention) for _ in range(c.decoder_layers[0])]
    self.memory = ChunkMemory(c)
    self.lmk_norm = [layers.RMSNorm(c.rms_eps) for _ in range(c.num_groups)]
    self.group = [[upper(c, attention) for _ in range(n)] for n in c.decoder_layers[1:]]
    self.final_norm = layers.RMSNorm(c.rms_eps)

  def __call__(self, tokens, *, train: bool = False):
    c = self.config
    _check_sequence(c, tokens.shape[1])
    x = self.lower_layers(self.chunk_rows(tokens))
    landmark_keys, k_mem, v_mem = self.encode(self.by_chunk(x))
    for g in range(c.num_groups):
      queries = self.retrieval_queries(g, self.by_chunk(x)[:, :, -1])
      selected = self.retrieve(g, queries, landmark_keys, train=train)
      self.sow("intermediates", f"retrieval_{g}", selected)
      x = self.upper_layers(g, x, k_mem, v_mem, retrieval_ops.shift_to_next_chunk(selected))
    return drop_landmarks(self.finish(x), c.chunk_size)

  def by_chunk(self, x):
    """Rows of whole chunks [b, n * S, d] -> [b, n, S, d] (the landmark row last)."""
    return x.reshape(x.shape[0], -1, self.config.chunk_size, x.shape[-1])

  def lower_layers(self, x):
    """The lower blocks (§2.3) over rows [b, rows, d] -> [b, rows, d]."""
    for block in self.lower:
      x = block(x)
    return x

  def encode(self, rows):
    """Lower-layer rows of whole chunks [b, n, S, d] -> landmark keys f32 [b, n, d] and the
    chunks' k, v [b, n, S, heads, head_dim] (§2.4)."""
    return self.memory(rows)

  def retrieval_queries(self, group: int, landmark_rows):
    """Group `group`'s landmark queries: landmark_rows [b, n, d] (hidden state at the group's
    start) -> f32 [b, n, d], what retrieve scores against the landmark keys."""
    return self.lmk_norm[group](landmark_rows)

  def rank(self, group, scores, query_chunks, key_chunks, *, train: bool):
    """What the top-k of group `group` (an int, or int [..., q] per query) ranks, for scores
    f32 [b, q, k] of query chunks
    query_chunks (int [..., q]) against key chunks key_chunks (int [..., k]): None for the
    scores themselves (learned retrieval outside training, or gumbel=False), scores + Gumbel noise
    (learned, training), or noise alone (random retrieval; outside training
    retrieval.inference_noise)."""
    c = self.config
    if c.retrieval == "random":
      if train:
        return retrieval_ops.gumbel_noise(self.make_rng("gumbel"), scores.shape)
      return jnp.broadcast_to(retrieval_ops.inference_noise(group, query_chunks, key_chunks),
                              scores.shape)
    if train and c.gumbel:
      return scores + retrieval_ops.gumbel_noise(self.make_rng("gumbel"), scores.shape)
    return None

  def retrieve(self, group: int, queries, landmark_keys, *, train: bool):
    """Top-k earlier chunks per chunk (§2.5). queries, keys [b, n, d] -> Retrieval [b, n, K]."""
    scores = retrieval_ops.chunk_scores(queries, landmark_keys)
    chunks = jnp.arange(scores.shape[1])
    ranking = self.rank(group, scores, chunks, jnp.arange(scores.shape[2]), train=train)
    mask = retrieval_ops.causal_chunk_mask(chunks, jnp.arange(scores.shape[2]))
    return retrieval_ops.select_chunks(scores, mask, self.config.topk, ranking)

  def upper_layers(self, group: int, x, k, v, serving: retrieval_ops.Retrieval):
    """Group `group`'s upper blocks (§2.6) over rows x [b, rows, d] and chunk keys and values
    k, v [b, m, S, heads, head_dim]; serving [b, n, K] indexes their m axis."""
    for block in self.group[group]:
      x = block(x, k, v, serving)
    return x

  def finish(self, x):
    """The final RMSNorm -> float32."""
    return self.final_norm(x)


def _validate(config: ModelConfig):
  layers_ = config.decoder_layers
  if not (len(layers_) >= 2 and all(n >= 1 for n in layers_[1:])):
    raise ConfigError(f"model.decoder_layers={layers_!r}: must be (lower, group_1, ...) with at "
                      "least one group of >= 1 upper layers")


def _decoder(config: ModelConfig, params, **options):
  from drt_jax import inference  # it builds on this module

  return inference.DRTDecoder(config, params, **options)


ARCHITECTURES = {"drt": Architecture(
    name="drt", module=DRT, decoder=_decoder, chunk_memories=("device", "host"),
    retrieval_groups=lambda config: config.num_groups, validate=_validate,
    sequence_multiple="chunk_len")}
