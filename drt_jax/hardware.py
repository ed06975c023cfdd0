"""Peak dense bf16 matmul rates per accelerator, for model FLOPs utilisation (MFU)."""

import jax

# Datasheet dense (no sparsity) bf16 tensor-core rates, FLOP/s per device.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: jax.Device | None = None) -> float | None:
  """The device's peak bf16 FLOP/s, or None when unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_BF16_FLOPS.items():
    if name in kind:
      return flops
  return None
