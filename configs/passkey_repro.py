"""The length-generalisation reproduction on one GPU (issue 5, launch/repro_passkey.sh).

A small DRT trained on 4032-token sequences (64 chunks) of byte-level text from `pydoc_data`
(present on every Python, no download), half of them turned into passkey samples (data/tasks.py),
for at most 10 minutes on one H100; then passkey retrieval is evaluated at 1x .. 1000x the
training length with the chunk memory in host memory.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.seed = 0
  model = config.model
  model.d_model = 256
  model.num_heads = 4  # head_dim 64, a Pallas kernel size
  model.num_kv_heads = 4
  model.mlp_dim = 768
  model.decoder_layers = (2, 2)  # one retrieval group
  model.encoder_layers = 1
  model.chunk_len = 63  # S = 64, the paper's chunk
  model.window = 256  # a sixteenth of the training length: the needle is found by retrieval
  model.topk = 4
  model.impl = "pallas"

  data = config.data
  data.seq_len = 63 * 64  # 4032 tokens
  data.eval_fraction = 0.15  # pydoc_data is ~0.5M tokens: enough held out for eval batches
  data.task_fraction = 0.5  # half the samples hold a passkey needle, question and answer
  data.tasks = "passkey"

  train = config.train
  train.global_batch_size = 16
  train.num_train_steps = 3000
  train.learning_rate = 2e-3
  train.warmup_steps = 150
  train.lr_floor = 0.1
  train.log_every = 50
  train.eval_every = 1000
  train.eval_batches = 4
  train.checkpoint_every = 500
  train.keep_checkpoints = 2
  return config
