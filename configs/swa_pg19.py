"""Sliding-window baseline of the paper (docs/specification.md §5): 12 ALiBi window-512 blocks, no
retrieval."""

from configs import drt_pg19


def get_config():
  config = drt_pg19.get_config()
  config.model.arch = "swa"
  config.data.seq_len = 16384  # no landmarks, so any length; the reference trains on 16K tokens
  return config
