"""Small configs shared by the tests: the real config files, shrunk."""

import jax

from configs import tiny
from drt_jax import config as config_lib


def small_config(**model_overrides):
  """configs/tiny.py shrunk to a few-second CPU model: 2 groups, k=3, 6 chunks of 7 tokens."""
  config = tiny.get_config()
  model = config.model
  model.d_model = 32
  model.num_heads = 2
  model.num_kv_heads = 2
  model.mlp_dim = 64
  model.decoder_layers = (1, 1, 1)
  model.encoder_layers = 1
  model.chunk_len = 7
  model.window = 12
  model.topk = 3
  model.dtype = "float32"
  for name, value in model_overrides.items():
    model[name] = value
  config.data.seq_len = 7 * 6
  return config


def model_config(config):
  return config_lib.validate(config)


def random_tokens(seed, batch, length, vocab=257):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)
