"""The `make train` default: a small DRT on the byte-level pydoc corpus, a few minutes on 2 CPU cores."""

from configs import base


def get_config():
  config = base.get_config()
  config.seed = 0
  model = config.model
  model.d_model = 128
  model.num_heads = 4
  model.num_kv_heads = 4
  model.mlp_dim = 384
  model.decoder_layers = (2, 2)
  model.encoder_layers = 1
  model.chunk_len = 15  # S = 16
  model.window = 64
  model.topk = 3
  model.dtype = "float32"  # CPU: bf16 is emulated and slower

  config.data.seq_len = 15 * 16  # 240 tokens, 16 chunks

  train = config.train
  train.global_batch_size = 16
  train.num_train_steps = 300
  train.learning_rate = 3e-3
  train.warmup_steps = 40
  train.lr_floor = 0.1
  train.log_every = 20
  train.eval_every = 100
  train.eval_batches = 4
  train.checkpoint_every = 100
  train.keep_checkpoints = 2
  return config
