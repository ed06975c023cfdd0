"""Mosaic GPU FlashGCA (kernels_pallas/gca_mosaic.py) against gca_reference.

CPU: the kernels in Mosaic GPU's interpret mode on small bf16 shapes, and the real Mosaic GPU
lowering (for CUDA, no GPU needed) at the paper's shape. GPU (`make test-gpu`, Hopper): the
paper's shape, forward and all four gradients, and decode.
"""

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas import gca as gca_lib
from kernels_pallas import gca_mosaic
from tests.test_gca_kernel import (TOLERANCE, _compare, _inputs, _rel_err,
                                   assert_decode_matches_reference)

# One chunk of 64 query rows, memory chunks of 64 keys: the only tile the kernels take.
SMALL = dict(chunk_len=64, mem_len=64, head_dim=64, dtype=jnp.bfloat16)

INTERPRET_CASES = [
    # chunks, heads, kv_heads, k, num_keys, off_by_one
    (3, 2, 1, 3, 63, True),
    (4, 2, 2, 2, 40, False),
]


def _settings(num_keys, off_by_one):
  return dict(scale=64**-0.5, num_keys=num_keys, softmax_off_by_one=off_by_one)


@pytest.mark.parametrize("chunks,heads,kv_heads,k,num_keys,off_by_one", INTERPRET_CASES)
def test_interpret_forward_and_gradients(chunks, heads, kv_heads, k, num_keys, off_by_one):
  inputs = _inputs(chunks + 10 * k, batch=1, chunks=chunks, heads=heads, kv_heads=kv_heads,
                   mem_chunks=chunks + 1, k=k, **SMALL)
  _compare(gca_mosaic.gca, *inputs, TOLERANCE["bf16"], kernel_kw=dict(interpret=True),
           **_settings(num_keys, off_by_one))


@pytest.mark.parametrize("rows,k,kv_heads", [(5, 3, 2)])
def test_interpret_decode(rows, k, kv_heads):
  q, k_mem, v_mem, indices, weights, _ = _inputs(rows, batch=2, chunks=1, heads=2,
                                                 kv_heads=kv_heads, mem_chunks=4, k=k, **SMALL)
  q, indices, weights = q[:, 0, :rows], indices[:, 0], weights[:, 0].at[:, 0].set(0.7)
  kw = _settings(63, True)
  got = gca_mosaic.gca_decode(q, k_mem, v_mem, indices, weights, interpret=True, **kw)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    want = gca_lib.gca_decode_reference(f32(q), f32(k_mem), f32(v_mem), indices, weights, **kw)
  assert got.shape == q.shape and got.dtype == q.dtype
  assert _rel_err(got, want) < TOLERANCE["bf16"]


PAPER = dict(batch=4, chunks=260, chunk_len=64, heads=12, kv_heads=12, head_dim=64,
             mem_chunks=260, k=8)


def _lower_for_cuda(fn, *args):
  """The Mosaic GPU lowering of jit(fn) for CUDA, run on this (CPU) host."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _paper_specs():
  """Abstract paper-shape inputs: q, k_mem, v_mem, indices, weights."""
  p = PAPER
  q = jax.ShapeDtypeStruct((p["batch"], p["chunks"], p["chunk_len"], p["heads"], p["head_dim"]),
                           jnp.bfloat16)
  mem = jax.ShapeDtypeStruct((p["batch"], p["mem_chunks"], p["chunk_len"], p["kv_heads"],
                              p["head_dim"]), jnp.bfloat16)
  slots = (p["batch"], p["chunks"], p["k"])
  return (q, mem, mem, jax.ShapeDtypeStruct(slots, jnp.int32),
          jax.ShapeDtypeStruct(slots, jnp.float32))


def test_kernels_lower_for_cuda_at_paper_shape():
  kw = _settings(63, True)

  def fwd_bwd(q, k_mem, v_mem, indices, weights):
    out, vjp = jax.vjp(lambda q, k, v, w: gca_mosaic.gca(q, k, v, indices, w, **kw),
                       q, k_mem, v_mem, weights)
    return out, vjp(out)

  text = _lower_for_cuda(fwd_bwd, *_paper_specs())
  for name in ("mosaic_gca_fwd", "mosaic_gca_bwd_dq", "mosaic_gca_bwd_dkdv"):
    assert name in text, name


@pytest.mark.parametrize("change,match", [
    (dict(chunk_len=32), "chunk_len=32"),
    (dict(mem_len=128), "mem_len=128"),
    (dict(head_dim=32), "head_dim=32"),
    (dict(dtype=jnp.float32), "float32"),
])
def test_unsupported_reason(change, match):
  shape = {**SMALL, **change}
  q = jnp.zeros((1, 2, shape["chunk_len"], 2, shape["head_dim"]), shape["dtype"])
  k_mem = jnp.zeros((1, 3, shape["mem_len"], 1, shape["head_dim"]), shape["dtype"])
  reason = gca_mosaic.unsupported_reason(q, k_mem)
  assert reason is not None and match in reason
  with pytest.raises(ValueError, match=match):
    gca_mosaic.gca(q, k_mem, k_mem, jnp.zeros((1, 2, 3), jnp.int32), jnp.ones((1, 2, 3)),
                   scale=1.0, interpret=True)


def test_supported_shape_has_no_reason():
  q = jnp.zeros((1, 2, 64, 4, 128), jnp.bfloat16)
  assert gca_mosaic.unsupported_reason(q, jnp.zeros((1, 3, 64, 2, 128), jnp.bfloat16)) is None


def test_decode_lowers_for_cuda_at_paper_shape():
  q, mem, _, indices, weights = _paper_specs()
  rows = jax.ShapeDtypeStruct((q.shape[0], 1, *q.shape[3:]), q.dtype)
  decode = lambda q, k, v, i, w: gca_mosaic.gca_decode(q, k, v, i, w, **_settings(63, True))
  slots = jax.ShapeDtypeStruct((q.shape[0], PAPER["k"]), jnp.int32)
  assert "mosaic_gca_fwd" in _lower_for_cuda(decode, rows, mem, mem, slots,
                                             slots.update(dtype=jnp.float32))


GPU_CASES = [
    # batch, chunks, heads, kv_heads, head_dim, mem_chunks, k, num_keys, obo
    (1, 259, 12, 12, 64, 260, 8, 63, True),  # the paper's training shape (one batch row)
    (2, 17, 8, 2, 128, 9, 5, None, False),
    (2, 33, 8, 4, 64, 40, 3, 31, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch,chunks,heads,kv_heads,head_dim,mem_chunks,k,num_keys,obo",
                         GPU_CASES)
def test_gpu_matches_reference(batch, chunks, heads, kv_heads, head_dim, mem_chunks, k, num_keys,
                               obo):
  inputs = _inputs(chunks, batch=batch, chunks=chunks, chunk_len=64, heads=heads,
                   kv_heads=kv_heads, head_dim=head_dim, mem_chunks=mem_chunks, mem_len=64, k=k,
                   dtype=jnp.bfloat16)
  _compare(jax.jit(gca_mosaic.gca, static_argnames=("scale", "num_keys", "softmax_off_by_one")),
           *inputs, TOLERANCE["bf16"], scale=head_dim**-0.5, num_keys=num_keys,
           softmax_off_by_one=obo)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2, 16, 64])
def test_gpu_decode(rows):
  assert_decode_matches_reference(gca_mosaic.gca_decode, rows)
