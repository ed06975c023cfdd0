"""Building blocks shared by every model: RMSNorm, SwiGLU MLP, projections, RoPE (§2.1, §2.4).

Params are float32 with logical axis names; matmuls run in the config's compute dtype; norms
compute in float32 and return float32 so the residual stream stays float32 (§2.8).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.config import ModelConfig


def normal_init(config: ModelConfig, axes: tuple[str, ...]):
  """Normal(0, init_std) initializer carrying logical axis names (§2.1: no depth scaling)."""
  return nn.with_logical_partitioning(nn.initializers.normal(config.init_std), axes)


class RMSNorm(nn.Module):
  """y = x * rsqrt(mean(x^2) + eps) * scale, in float32. [..., d_model] -> float32 [..., d_model]."""
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


class Projection(nn.Module):
  """Bias-free linear map contracting the last `in_axes` input axes, in the compute dtype.

  The kernel is stored in its full shape (e.g. [d_model, heads, head_dim]) so every axis carries
  its own logical name. [..., *in] -> [..., *features].
  """
  config: ModelConfig
  features: tuple[int, ...]
  axes: tuple[str, ...]
  in_axes: int = 1

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.in_axes:]
    kernel = self.param("kernel", normal_init(self.config, self.axes),
                        tuple(in_shape) + tuple(self.features), jnp.float32)
    dtype = self.config.compute_dtype
    contract = tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes))
    return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))


def dense(config: ModelConfig, features, axes: tuple[str, ...], name: str, in_axes: int = 1):
  features = (features,) if isinstance(features, int) else tuple(features)
  return Projection(config, features, axes, in_axes, name=name)


class SwiGLU(nn.Module):
  """W_down(silu(W_gate x) * W_up x). [..., d_model] -> compute dtype [..., d_model]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = dense(c, c.mlp_dim, ("embed", "mlp"), "gate")(x)
    up = dense(c, c.mlp_dim, ("embed", "mlp"), "up")(x)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return dense(c, c.d_model, ("mlp", "embed"), "down")(hidden)


def head_projection(config: ModelConfig, heads: int, name: str):
  """[..., d_model] -> [..., heads, head_dim]."""
  return dense(config, (heads, config.head_dim), ("embed", "heads", "head_dim"), name)


def output_projection(config: ModelConfig, name: str):
  """[..., heads, head_dim] -> [..., d_model]."""
  return dense(config, config.d_model, ("heads", "head_dim", "embed"), name, in_axes=2)


def apply_rope(x, theta: float, positions=None):
  """HF-Llama "rotate-half" RoPE (§2.4).

  x: [..., length, heads, head_dim]; positions: int broadcastable to [..., length], the rows'
  positions (default 0 .. length - 1). Returns x's shape and dtype. The angles are computed in
  float32 from the positions, so a row gets the same rotation in a one-shot forward and when
  decoded at its position.
  """
  length, head_dim = x.shape[-3], x.shape[-1]
  if positions is None:
    positions = jnp.arange(length)
  inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
              ).astype(np.float32)
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [..., length, head_dim / 2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[..., None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[..., None, :]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)
