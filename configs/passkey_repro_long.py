"""Second phase of the passkey reproduction (launch/repro_passkey.sh): configs/passkey_repro.py's
model continued on 4032-token samples (64 chunks), started from its params (train.init_from,
which the launch script sets to the first phase's run folder).

Why: the first phase teaches copying through retrieval with at most 14 candidate chunks per
retrieval; at 1000x a retrieval ranks tens of thousands of haystack chunks, and every miss of the
evaluation is the retriever's (needle_retrieved = accuracy). The chunks a retrieval draws (Gumbel
top-k) and mixes are the highest-scoring distractors among its candidates, so more candidates per
retrieval train the ranking against harder ones: after a second phase on 2016-token samples
(30 candidates) the run scored 100% up to 64x and 92% / 95% at 256x / 1000x; this phase has 62.
The training length, and so the 1x .. 1000x of the evaluation, is this phase's 4032.
"""

from configs import passkey_repro


def get_config():
  config = passkey_repro.get_config()
  config.data.seq_len = 63 * 64  # 4032 tokens
  train = config.train
  train.global_batch_size = 16  # the first phase's tokens per step
  train.num_train_steps = 4000
  train.learning_rate = 1e-3
  train.warmup_steps = 200
  train.eval_every = 1000
  train.checkpoint_every = 1000
  return config
