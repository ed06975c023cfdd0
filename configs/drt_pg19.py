"""The paper's 128M DRT on PG19 with the GPT-2 tokenizer (REFERENCE_DRT.md §6).

Needs PG19 prepared for TFDS (`tfds build pg19` on a machine with the data) and the GPT-2
tokenizer JSON at data.tokenizer. Per device batch 4 on 8 GPUs as in the paper.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.vocab_size = 50265
  config.model.impl = "pallas"
  config.data.source = "tfds"
  config.data.tfds_name = "pg19"
  config.data.tokenizer = "gpt2/tokenizer.json"
  return config
