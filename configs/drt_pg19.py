"""The paper's 128M DRT on PG19 with the GPT-2 tokenizer (docs/specification.md §6).

PG19 as its raw text files, one book per file, no tensorflow needed: the `train/` and `validation/`
folders of the PG19 release (e.g. `gsutil -m cp -r gs://deepmind-gutenberg/train
gs://deepmind-gutenberg/validation pg19/`), read by the text source. The GPT-2 tokenizer JSON at
data.tokenizer (e.g. the reference's config/gpt2-small/tokenizer.json, 50265 entries) gives the
vocabulary size and the end-of-text token. Other places for the files:
--config.data.path=DIR/train --config.data.eval_path=DIR/validation. Process 0 tokenizes both
splits once (about 2.9B tokens for train) into data.cache_dir; later runs and the other processes
read that cache. Per device batch 4 on 8 GPUs as in the paper.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.vocab_size = 0  # the tokenizer's
  config.model.impl = "auto"  # the fastest kernels of the device (attention_impls.py)
  config.data.source = "text"
  config.data.path = "pg19/train"
  config.data.eval_path = "pg19/validation"
  config.data.tokenizer = "gpt2/tokenizer.json"
  return config
