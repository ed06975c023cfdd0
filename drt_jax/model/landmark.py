"""Landmark Attention (Mohtashami & Jaggi, 2023): the DRT paper's strongest baseline.

Every chunk_len tokens get a landmark row (the learned vector params["landmark"], as in DRT), so a
block is DRT's chunk: S = chunk_len + 1 rows. Every layer's self-attention is the grouped softmax
of model/landmark_attention.py; the blocks are otherwise DRT's decoder blocks (RMSNorm, SwiGLU).

Positions are RoPE (base model.rope_theta) restarting in every block (landmark_attention.rotate).

LandmarkLM is the one module of training and decoding: `__call__` is the one-shot forward and
composes the stage methods (chunk_rows / token_row / landmark_row -> layers -> finish) that
decoding calls one piece at a time with mode "segment" or "step"; those modes keep a cache per
layer (flax collection "cache"): every finished block's rotated keys and values, and the current
block's rows.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from drt_jax.config import ConfigError, ModelConfig
from drt_jax.model import layers
from drt_jax.model.architectures import Architecture
from drt_jax.model.attention import write_rows
from drt_jax.model.blocks import DecoderBlock
from drt_jax.model.drt import LandmarkRows, drop_landmarks, maybe_remat, token_embedding
from drt_jax.model.landmark_attention import (attend_blocks, grouped_attention, landmark_attention,
                                              own_block_mask, rotate)


class LandmarkSelfAttention(nn.Module):
  """Landmark attention of one layer. Shapes: b batch, n blocks of S rows, d d_model.

  mode "train": x [b, n * S, d], whole blocks of one sequence from its start (no state).
  mode "segment": x [b, n * S, d], whole blocks continuing each sequence from its own block
    boundary, over the cached blocks before them.
  mode "step": x [b, 1, d], one new row per sequence, each at its own position.
  topk: None lets every earlier block compete (training); an int keeps each query's top-k
  earlier blocks (inference, model.landmark_selection). Returns the compute dtype, like x.
  """
  config: ModelConfig
  mode: str = "train"
  capacity: int = 0  # blocks the cache holds (modes "segment" and "step")

  @nn.compact
  def __call__(self, x, topk):
    c = self.config
    size = c.chunk_size
    q = layers.head_projection(c, c.num_heads, "q")(x)
    k = layers.head_projection(c, c.num_kv_heads, "k")(x)
    v = layers.head_projection(c, c.num_kv_heads, "v")(x)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    settings = dict(scale=c.head_dim ** -0.5, topk=topk, selection=c.landmark_selection)
    if self.mode == "train":
      out = landmark_attention(q, k, v, chunk_size=size, theta=c.rope_theta, **settings)
    elif self.mode == "segment":
      out = self._segment(q, k, v, settings)
    else:
      out = self._step(q, k, v, settings)
    return layers.output_projection(c, "o")(out)

  def _cache(self, batch: int, dtype):
    c = self.config
    kv = (c.num_kv_heads, c.head_dim)
    memory = (batch, self.capacity, c.chunk_size) + kv
    own = (batch, c.chunk_size) + kv
    variable = lambda name, shape, kind: self.variable("cache", name, jnp.zeros, shape, kind)  # noqa: E731
    return (variable("memory_k", memory, dtype), variable("memory_v", memory, dtype),
            variable("own_k", own, dtype), variable("own_v", own, dtype),
            variable("position", (batch,), jnp.int32))

  def _segment(self, q, k, v, settings):
    """Whole blocks (q [b, n * S, heads, head_dim]) continuing each sequence from its own block
    boundary: they join the cached memory, and each attends the memory blocks before it."""
    c = self.config
    size, theta = c.chunk_size, c.rope_theta
    batch, rows = q.shape[:2]
    in_blocks = lambda t: t.reshape((batch, rows // size, size) + t.shape[2:])  # noqa: E731
    q, k, v = in_blocks(q), in_blocks(k), in_blocks(v)
    mem_k, mem_v, _, _, position = self._cache(batch, k.dtype)
    first = position.value // size  # [b]
    mem_k.value = write_rows(mem_k.value, rotate(k, theta, earlier=True), first)
    mem_v.value = write_rows(mem_v.value, v, first)
    position.value = position.value + rows
    out = attend_blocks(rotate(q, theta), rotate(k, theta), v, mem_k.value, mem_v.value, first,
                        **settings)
    return out.reshape((batch, rows) + out.shape[3:])

  def _step(self, q, k, v, settings):
    """One row per sequence (q [b, 1, heads, head_dim]) at its own position."""
    size, theta = self.config.chunk_size, self.config.rope_theta
    batch = q.shape[0]
    mem_k, mem_v, own_k, own_v, position = self._cache(batch, k.dtype)
    row, block = position.value % size, position.value // size
    seqs = jnp.arange(batch)
    own_k.value = own_k.value.at[seqs, row].set(k[:, 0])
    own_v.value = own_v.value.at[seqs, row].set(v[:, 0])
    # Rotated as a whole block, then the row taken: the same values as the one-shot forward's.
    q = jnp.take_along_axis(rotate(jnp.broadcast_to(q, (batch, size) + q.shape[2:]), theta),
                            row[:, None, None, None], axis=1)
    mem_visible = jnp.arange(self.capacity)[None, None, :] < block[:, None, None]
    out = grouped_attention(q, rotate(own_k.value, theta), own_v.value,
                            own_block_mask(row[:, None], size), mem_k.value, mem_v.value,
                            mem_visible, **settings)
    # A landmark row finishes its block, which joins the memory.
    closes = (row == size - 1)[:, None, None, None]
    slot = jnp.minimum(block, self.capacity - 1)
    mem_k.value = mem_k.value.at[seqs, slot].set(
        jnp.where(closes, rotate(own_k.value, theta, earlier=True), mem_k.value[seqs, slot]))
    mem_v.value = mem_v.value.at[seqs, slot].set(
        jnp.where(closes, own_v.value, mem_v.value[seqs, slot]))
    position.value = position.value + 1
    return out


class LandmarkLM(LandmarkRows):
  """tokens int [batch, T] (T a multiple of chunk_len) -> final-normed hidden float32 [batch, T, d].

  sum(model.decoder_layers) landmark-attention blocks (the same depth as DRT and the sliding-window
  baseline). train=True: grouped softmax over every earlier block (the paper's training);
  train=False: each query's top-k earlier blocks (model.topk), the inference rule, so the one-shot
  forward equals incremental decoding. Landmark rows are inserted after every chunk_len tokens and
  dropped from the output, so output row t belongs to raw token t.
  """
  config: ModelConfig
  mode: str = "train"  # see LandmarkSelfAttention
  capacity: int = 0

  def setup(self):
    c = self.config
    attention = functools.partial(LandmarkSelfAttention, mode=self.mode, capacity=self.capacity)
    self.embed = token_embedding(c)
    self.landmark = self.param("landmark", layers.normal_init(c, ("embed",)), (c.d_model,),
                               jnp.float32)
    block = maybe_remat(c, DecoderBlock, self.mode, static_argnums=(2,))  # topk is static
    self.blocks = [block(c, attention) for _ in range(sum(c.decoder_layers))]
    self.final_norm = layers.RMSNorm(c.rms_eps)

  def __call__(self, tokens, *, train: bool = False):
    c = self.config
    if tokens.shape[1] % c.chunk_len:
      raise ValueError(f"sequence length {tokens.shape[1]} must be a multiple of "
                       f"model.chunk_len={c.chunk_len}")
    x = self.layers(self.chunk_rows(tokens), None if train else c.topk)
    return drop_landmarks(self.finish(x), c.chunk_size)

  def layers(self, x, topk):
    """Every landmark-attention block over rows [b, rows, d] -> [b, rows, d]; topk as
    LandmarkSelfAttention's."""
    for block in self.blocks:
      x = block(x, topk)
    return x

  def finish(self, x):
    """The final RMSNorm -> float32."""
    return self.final_norm(x)


def _validate(config: ModelConfig):
  # Its attention is XLA's whatever the device ("auto"); naming a kernel impl is a mistake.
  if config.impl not in ("auto", "xla"):
    raise ConfigError(f"model.impl={config.impl!r}: model.arch='landmark' has no Pallas kernel; "
                      "must be 'auto' or 'xla'")


def _decoder(config: ModelConfig, params, **options):
  from drt_jax import landmark_inference  # it builds on this module

  return landmark_inference.LandmarkDecoder(config, params, **options)


ARCHITECTURES = {
    "landmark": Architecture(name="landmark", module=LandmarkLM, decoder=_decoder,
                             chunk_memories=("device",), validate=_validate,
                             sequence_multiple="chunk_len"),
}
