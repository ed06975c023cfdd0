"""Second phase of the passkey reproduction (launch/repro_passkey.sh): configs/passkey_repro.py's
model continued on 2016-token samples (32 chunks), started from its params (train.init_from,
which the launch script sets to the first phase's run folder).

Why: the first phase teaches copying through retrieval with at most 14 candidate chunks per
retrieval; at 1000x a retrieval ranks ~16,000 haystack chunks and the needle's margin was thin
(80% at 1000x in one run, 100% in another of the same config). Twice the candidates per
retrieval, at a lower learning rate, trains the ranking against more distractors. The training
length, and so the 1x .. 1000x of the evaluation, is this phase's 2016.
"""

from configs import passkey_repro


def get_config():
  config = passkey_repro.get_config()
  config.data.seq_len = 63 * 32  # 2016 tokens
  train = config.train
  train.global_batch_size = 32  # the first phase's tokens per step
  train.num_train_steps = 4000
  train.learning_rate = 1e-3
  train.warmup_steps = 200
  train.eval_every = 1000
  train.checkpoint_every = 1000
  return config
