"""Model construction and the language-modelling loss shared by every architecture (§1.3)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from drt_jax.config import ModelConfig
from drt_jax.model import architectures
from drt_jax.model.head import cross_entropy_sum, tied_logits


def make_model(config: ModelConfig) -> nn.Module:
  """The training module of model.arch (model/architectures.py)."""
  return architectures.make_model(config)


def init_params(model: nn.Module, rng, batch: int, length: int):
  """Float32 params (boxed with logical axis names) for inputs of shape [batch, length]."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  params_rng, gumbel_rng = jax.random.split(rng)
  return model.init({"params": params_rng, "gumbel": gumbel_rng}, tokens, train=False)["params"]


def loss_terms(model: nn.Module, params, tokens, *, train: bool, rng, target_weights=None):
  """Summed (weighted) next-token cross-entropy and the summed weights (float32 scalars).

  tokens: int [batch, T]. Token t predicts token t + 1 (the last token has no target, §1.3);
  target_weights: optional [batch, T], the weight of token t as a target (0 = not scored;
  default 1 for every token).
  """
  hidden = model.apply({"params": params}, tokens, train=train, rngs={"gumbel": rng})
  mask = jnp.ones(tokens[:, 1:].shape, jnp.float32)
  if target_weights is not None:
    mask = mask * target_weights[:, 1:].astype(jnp.float32)
  embedding = params["embed"]["embedding"]
  return cross_entropy_sum(hidden[:, :-1], embedding, tokens[:, 1:], mask,
                           dtype=model.config.compute_dtype)


def logits(model: nn.Module, params, tokens, *, train: bool = False, rng=None):
  """float32 [batch, T, vocab]: row t is the distribution of token t + 1. For evaluation sizes."""
  rng = jax.random.key(0) if rng is None else rng
  hidden = model.apply({"params": params}, tokens, train=train, rngs={"gumbel": rng})
  return tied_logits(hidden, params["embed"]["embedding"], model.config.compute_dtype)


def answer_hits(model: nn.Module, params, tokens, answer_start, answer, *, rng):
  """Teacher-forced greedy answers of task samples, scored without noise.

  tokens: int [batch, T] holding the answers; answer_start: int [batch], where each answer
  begins; answer: int [batch, A]. Returns float32 [batch, A]: 1 where the argmax at row
  answer_start + i - 1 is answer token i.
  """
  hidden = model.apply({"params": params}, tokens, train=False, rngs={"gumbel": rng})
  rows = answer_start[:, None] - 1 + jnp.arange(answer.shape[1])
  hidden = jnp.take_along_axis(hidden, rows[..., None], axis=1)
  predicted = jnp.argmax(tied_logits(hidden, params["embed"]["embedding"],
                                     model.config.compute_dtype), axis=-1)
  return (predicted == answer).astype(jnp.float32)
