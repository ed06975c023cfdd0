"""Landmark Attention baseline of the paper (Mohtashami & Jaggi, 2023) at DRT's shape: 12 layers of
grouped-softmax attention over blocks of 63 tokens + 1 landmark, top-k blocks at inference."""

from configs import drt_pg19


def get_config():
  config = drt_pg19.get_config()
  config.model.arch = "landmark"
  config.model.impl = "xla"  # plain JAX: a flash-style scan over tiles of blocks (no Pallas kernel)
  config.model.topk = 4  # blocks per query at inference, as the reference's landmark eval scripts
  return config
