"""The language-modelling comparison at small scale (launch/repro_ppl.sh, issue 14): DRT with 1 and
2 retrieval groups, the sliding-window baseline (also with 2 more layers), Landmark Attention and
full attention, each with the same training tokens, on the standard library's Python sources
(data.source="pystdlib", held out by file: no download).

One model shape for all (the variants set model.arch and model.decoder_layers): 6 layers of
d_model 256, 2016-token samples (32 chunks of 63), window 256 (4 chunks, the paper's 512 of 16K
scaled down: retrieval must reach past it within a sample), k = 8. 2,500 steps of 16 x 2016 tokens
(81M tokens): the paper's recipe shrunk to about a minute per run on one H200 (launch/repro_ppl.sh
says how that was estimated).
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
  model.decoder_layers = (3, 3)  # DRT, one group; the variants set their own
  model.encoder_layers = 1
  model.chunk_len = 63
  model.window = 256
  model.topk = 8
  model.impl = "auto"  # the fastest kernels of the device (attention_impls.py)

  data = config.data
  data.source = "pystdlib"
  data.seq_len = 63 * 32  # 2016 tokens

  train = config.train
  train.global_batch_size = 16
  train.num_train_steps = 2500
  train.learning_rate = 2e-3
  train.warmup_steps = 200
  train.lr_floor = 0.1
  train.log_every = 100
  train.eval_every = 500
  train.eval_batches = 4
  train.checkpoint_every = 500
  train.keep_checkpoints = 1
  return config
