"""Mosaic GPU sliding-window attention (kernels_pallas/sliding_window_mosaic.py) vs the reference.

CPU: Mosaic GPU's interpret mode on small bf16 shapes against the float32 reference (forward,
gradients and the decode step), and the real Mosaic GPU lowering for CUDA at the paper's shape
(lowered, not run). GPU (`-m gpu`): the paper's shape in bf16, within the Triton path's tolerance.
"""

import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from drt_jax.model import attention
from drt_jax.model import attention_impls as impls
from kernels_pallas import sliding_window_mosaic as swm
from tests.test_sliding_window_kernel import kernel_and_reference as triton_kernel_and_reference
from tests.test_sliding_window_kernel import (decode_and_full_sequence, random_inputs, rel_err,
                                              slopes_for)

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


def decode_and_reference(window, cache_len, batch, heads, kv_heads, head_dim, alibi, block_sizes,
                         interpret):
  """(the Mosaic decode step, the f32 full-sequence forward) at each sequence's position, bf16
  caches of cache_len slots."""
  length = 2 * cache_len + 44
  q, k, v, _ = random_inputs(window + cache_len, batch, length, heads, kv_heads, head_dim,
                             jnp.bfloat16)
  positions = np.array([length - 1, 10, 0, cache_len + 3, window, cache_len - 1][:batch])
  return decode_and_full_sequence(swm.sliding_window_decode, q, k, v, slopes_for(heads, alibi),
                                  positions, window=window, cache_len=cache_len,
                                  block_sizes=block_sizes, interpret=interpret)


# (window, cache_len, heads, kv_heads, alibi, block_sizes): the ring larger than and equal to
# window + 1, GQA group 2 and 1, both tile sizes, fewer steps than stages.
DECODE_CASES = [
    (100, 128, 4, 2, True, swm.MosaicBlockSizes()),
    (127, 128, 2, 2, False, swm.MosaicBlockSizes(block_k=128)),
    (60, 192, 2, 1, True, swm.MosaicBlockSizes(stages=2)),
]


@pytest.mark.parametrize("window,cache_len,heads,kv_heads,alibi,block_sizes", DECODE_CASES)
def test_decode_matches_the_full_sequence_interpret(window, cache_len, heads, kv_heads, alibi,
                                                   block_sizes):
  got, want = decode_and_reference(window, cache_len, 6, heads, kv_heads, 64, alibi, block_sizes,
                                   True)
  assert got.dtype == jnp.bfloat16 and got.shape == want.shape
  assert bool(jnp.isfinite(got).all())  # the NaN of unwritten slots never leaks
  assert rel_err(got, want) < TOLERANCE["out"]


def test_decode_unsupported_reasons():
  q = jax.ShapeDtypeStruct((2, 4, 64), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((2, 576, 2, 64), jnp.bfloat16)
  position = jnp.zeros(2, jnp.int32)
  assert swm.unsupported_reason(q, cache, cache, window=512, position=position) is None
  odd = jax.ShapeDtypeStruct((2, 513, 2, 64), jnp.bfloat16)
  assert "cache_len=513 must be a multiple of block_k=64" in swm.unsupported_reason(
      q, odd, odd, window=512, position=position)
  assert "cache_len=576 must be >= window + 1" in swm.unsupported_reason(
      q, cache, cache, window=600, position=position)
  with pytest.raises(ValueError, match="cache_len=513"):
    swm.sliding_window_decode(jnp.zeros(q.shape, q.dtype), jnp.zeros(odd.shape, odd.dtype),
                              jnp.zeros(odd.shape, odd.dtype), window=512, scale=1.0,
                              position=position)


def test_decoding_rings_fit_the_mosaic_decode_step(caplog):
  """The model's rings (attention.ring_slots) take the Mosaic decode step for any window."""
  q = jax.ShapeDtypeStruct((1, 4, 64), jnp.bfloat16)
  for window in (1, 63, 64, 100, 512):
    slots = attention.ring_slots(window)
    assert window + 1 <= slots < window + 1 + attention.RING_TILE
    cache = jax.ShapeDtypeStruct((1, slots, 2, 64), jnp.bfloat16)
    assert impls.SLIDING_WINDOW_DECODE.choose(
        ("mosaic", "triton", "xla"), q, cache, cache, window=window, scale=1.0,
        position=jnp.zeros(1, jnp.int32)) == "mosaic"


def test_decode_lowers_for_cuda_at_paper_shape():
  batch, _, heads, kv_heads, head_dim = PAPER_SHAPE
  q = jax.ShapeDtypeStruct((batch, heads, head_dim), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((batch, attention.ring_slots(512), kv_heads, head_dim),
                               jnp.bfloat16)
  slopes = slopes_for(heads, True)
  step = lambda q, k, v, p: swm.sliding_window_decode(q, k, v, slopes, window=512,
                                                      scale=head_dim ** -0.5, position=p)
  assert "mosaic_gpu" in lower_for_cuda(step, q, cache, cache,
                                        jax.ShapeDtypeStruct((batch,), jnp.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_sizes", [
    (12, 12, 64, None),  # the paper's heads, the model's ring at window 512
    (8, 2, 128, swm.MosaicBlockSizes(block_k=128, stages=2)),
])
def test_decode_matches_the_full_sequence_gpu(heads, kv_heads, head_dim, block_sizes):
  cache_len = attention.ring_slots(512) if block_sizes is None else 640
  got, want = decode_and_reference(512, cache_len, 6, heads, kv_heads, head_dim, True,
                                   block_sizes, False)
  assert bool(jnp.isfinite(got).all())
  assert rel_err(got, want) < TOLERANCE["out"]
