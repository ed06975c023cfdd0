"""Mosaic GPU sliding-window attention (kernels_pallas/sliding_window_mosaic.py) vs the reference.

CPU: Mosaic GPU's interpret mode on small bf16 shapes against the float32 reference (forward and
gradients), and the real Mosaic GPU lowering for CUDA at the paper's shape (lowered, not run).
GPU (`-m gpu`): the paper's shape in bf16, within the Triton path's tolerance.
"""

import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from kernels_pallas import sliding_window_mosaic as swm
from tests.test_sliding_window_kernel import kernel_and_reference as triton_kernel_and_reference
from tests.test_sliding_window_kernel import rel_err, random_inputs, slopes_for

# bf16 inputs, so the outputs carry bf16 rounding (~2e-3); gradients twice the forward's.
TOLERANCE = {"out": 1e-2, "dq": 2e-2, "dk": 2e-2, "dv": 2e-2}


# (out, dq, dk, dv) of the Mosaic kernels and of the f32 reference on the same upcast inputs.
kernel_and_reference = functools.partial(triton_kernel_and_reference,
                                         attention=swm.sliding_window_attention)


# (length, heads, kv_heads, head_dim, window, alibi, block_sizes): two 128-query blocks at least, a
# window smaller than, equal to and past the band of one block, GQA group 2, both streamed tiles.
CASES = [
    (256, 2, 1, 64, 64, True, swm.MosaicBlockSizes()),
    (256, 2, 2, 64, 128, False, swm.MosaicBlockSizes(block_k=128, block_k_dq=128, block_q_dkv=128)),
    (384, 2, 1, 64, 100, True, swm.MosaicBlockSizes(stages=2, stages_dq=2, stages_dkv=2)),
]


@pytest.mark.parametrize("length,heads,kv_heads,head_dim,window,alibi,block_sizes", CASES)
def test_forward_matches_reference_interpret(length, heads, kv_heads, head_dim, window, alibi,
                                             block_sizes):
  q, k, v, _ = random_inputs(length + window, 1, length, heads, kv_heads, head_dim, jnp.bfloat16)
  slopes = slopes_for(heads, alibi)
  got = swm.sliding_window_attention(q, k, v, slopes, window=window, scale=head_dim ** -0.5,
                                     block_sizes=block_sizes, interpret=True)
  with jax.default_matmul_precision("highest"):
    want = swm.sliding_window_reference(*(x.astype(jnp.float32) for x in (q, k, v)), slopes,
                                        window=window, scale=head_dim ** -0.5)
  assert got.dtype == jnp.bfloat16 and got.shape == want.shape
  assert rel_err(got, want) < TOLERANCE["out"]


@pytest.mark.parametrize("length,heads,kv_heads,head_dim,window,alibi,block_sizes", CASES[:2])
def test_gradients_match_reference_interpret(length, heads, kv_heads, head_dim, window, alibi,
                                             block_sizes):
  q, k, v, do = random_inputs(length * window, 1, length, heads, kv_heads, head_dim, jnp.bfloat16)
  got, want = kernel_and_reference(q, k, v, do, slopes_for(heads, alibi), window, block_sizes, True)
  for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.dtype == jnp.bfloat16 and x.shape == ref.shape
    assert rel_err(x, ref) < TOLERANCE[name], name


def test_unsupported_reason():
  q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  assert swm.unsupported_reason(q, q, q, window=64) is None
  f32 = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  assert "dtype=float32" in swm.unsupported_reason(f32, f32, f32, window=64)
  odd = jax.ShapeDtypeStruct((1, 200, 2, 64), jnp.bfloat16)
  assert "length=200" in swm.unsupported_reason(odd, odd, odd, window=64)
  small = jax.ShapeDtypeStruct((1, 256, 2, 32), jnp.bfloat16)
  assert "head_dim=32" in swm.unsupported_reason(small, small, small, window=64)
  x = jnp.zeros(q.shape, q.dtype)
  with pytest.raises(ValueError, match="head_dim=32"):
    swm.sliding_window_attention(x[..., :32], x[..., :32], x[..., :32], window=4, scale=1.0)


# batch, length, heads, kv_heads, head_dim: bench/sliding_window.py's shape.
PAPER_SHAPE = (4, 16640, 12, 12, 64)


def lower_for_cuda(fn, *args) -> str:
  """Runs the Mosaic GPU lowering for CUDA on this machine (no GPU needed) and returns the HLO."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_forward_lowers_for_cuda_at_paper_shape():
  batch, length, heads, kv_heads, head_dim = PAPER_SHAPE
  q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16)
  slopes = slopes_for(heads, True)
  attend = lambda q, k, v: swm.sliding_window_attention(q, k, v, slopes, window=512,
                                                        scale=head_dim ** -0.5)
  assert "mosaic_gpu" in lower_for_cuda(attend, q, kv, kv)


def test_backward_lowers_for_cuda_at_paper_shape():
  batch, length, heads, kv_heads, head_dim = PAPER_SHAPE
  q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16)
  slopes = slopes_for(heads, True)

  def train(q, k, v, do):
    _, vjp = jax.vjp(lambda q, k, v: swm.sliding_window_attention(
        q, k, v, slopes, window=512, scale=head_dim ** -0.5), q, k, v)
    return vjp(do)

  assert lower_for_cuda(train, q, kv, kv, q).count("mosaic_gpu") >= 3  # forward, dK/dV, dQ


@pytest.mark.gpu
@pytest.mark.parametrize("batch,length,heads,kv_heads,head_dim,alibi", [
    (*PAPER_SHAPE, True),
    (2, 1024, 8, 2, 128, False),
])
def test_matches_reference_gpu(batch, length, heads, kv_heads, head_dim, alibi):
  """bf16 within the Triton path's tolerance (tests/test_sliding_window_kernel.py: 1e-2)."""
  q, k, v, do = random_inputs(length, batch, length, heads, kv_heads, head_dim, jnp.bfloat16)
  got, want = kernel_and_reference(q, k, v, do, slopes_for(heads, alibi), 512, None, False)
  for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
    assert bool(jnp.isfinite(x).all()), name
    assert rel_err(x, ref) < 1e-2, name
