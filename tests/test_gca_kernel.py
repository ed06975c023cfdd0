"""FlashGCA kernels (kernels_pallas/gca.py) against gca_reference: forward and all four gradients.

CPU: interpret mode in f32 (and one bf16 case) on small shapes. GPU (`make test-gpu`): the paper's
shape and the extremes of the supported range, bf16 and f32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import gca as gca_lib

# ||x - ref|| / ||ref||; gradients get twice the forward tolerance.
TOLERANCE = {"f32_interpret": 1e-5, "f32_gpu": 1e-5, "bf16": 1e-2}


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  assert np.all(np.isfinite(x)), "non-finite values in the kernel output"
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _inputs(seed, *, batch, chunks, chunk_len, heads, kv_heads, head_dim, mem_chunks, mem_len, k,
            dtype):
  """Fresh random inputs with the awkward cases built in: chunk 0 retrieves one memory chunk in
  two slots, chunk 1 retrieves that chunk too, and chunk 0's last slot is invalid (weight 0)."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 7)
  q = jax.random.normal(keys[0], (batch, chunks, chunk_len, heads, head_dim), jnp.float32)
  mem_shape = (batch, mem_chunks, mem_len, kv_heads, head_dim)
  k_mem = jax.random.normal(keys[1], mem_shape, jnp.float32)
  v_mem = jax.random.normal(keys[2], mem_shape, jnp.float32)
  indices = jax.random.randint(keys[3], (batch, chunks, k), 0, mem_chunks)
  weights = jax.random.uniform(keys[4], (batch, chunks, k), minval=0.1, maxval=1.0)
  indices = indices.at[:, 1, 0].set(indices[:, 0, 0])
  if k > 1:
    indices = indices.at[:, 0, 1].set(indices[:, 0, 0])
  weights = weights.at[:, 0, k - 1].set(0.0)
  do = jax.random.normal(keys[5], q.shape, jnp.float32)
  cast = lambda x: x.astype(dtype)
  return cast(q), cast(k_mem), cast(v_mem), indices, weights, do


def _fwd_and_grads(fn, q, k_mem, v_mem, indices, weights, do):
  out, vjp = jax.vjp(lambda q, k, v, w: fn(q, k, v, indices, w), q, k_mem, v_mem, weights)
  return (out, *vjp(do.astype(out.dtype)))


def _compare(kernel_fn, q, k_mem, v_mem, indices, weights, do, tol, kernel_kw=None, **kw):
  """Kernel (on the given dtype) against the reference on the f32 upcast of the same inputs."""
  kernel_kw = {**kw, **(kernel_kw or {})}
  got = _fwd_and_grads(lambda *a: kernel_fn(*a, **kernel_kw), q, k_mem, v_mem, indices, weights,
                       do)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    want = _fwd_and_grads(lambda *a: gca_lib.gca_reference(*a, **kw), f32(q), f32(k_mem),
                          f32(v_mem), indices, weights, do)
  for name, g, w, t in zip(("out", "dq", "dk", "dv", "dw"), got, want, (tol,) + (2 * tol,) * 4):
    err = _rel_err(g, w)
    assert err < t, f"{name}: rel err {err:.3g} >= {t}"


# A covering set rather than the product: every k in {1, 3, 5, 8}, GQA group in {1, 2, 4},
# chunk_len and head_dim in {32, 64} each appear, with masked keys, off-by-one on and off,
# mem_len != chunk_len and a query block smaller than the chunk.
INTERPRET_CASES = [
    # k, group, chunk_len, head_dim, mem_len, num_keys, off_by_one, block_q
    (1, 1, 32, 32, 32, None, False, 32),
    (3, 2, 64, 32, 64, 63, True, 64),
    (5, 4, 32, 64, 32, 20, False, 16),
    (8, 1, 64, 64, 64, 63, True, 64),
    (3, 2, 32, 32, 64, None, True, 16),
]


@pytest.mark.parametrize("k,group,chunk_len,head_dim,mem_len,num_keys,off_by_one,block_q",
                         INTERPRET_CASES)
def test_interpret_matches_reference(k, group, chunk_len, head_dim, mem_len, num_keys, off_by_one,
                                     block_q):
  inputs = _inputs(k * 100 + group, batch=2, chunks=3, chunk_len=chunk_len, heads=2 * group,
                   kv_heads=2, head_dim=head_dim, mem_chunks=4, mem_len=mem_len, k=k,
                   dtype=jnp.float32)
  _compare(gca_lib.gca, *inputs, TOLERANCE["f32_interpret"], scale=head_dim**-0.5,
           num_keys=num_keys, softmax_off_by_one=off_by_one,
           kernel_kw=dict(block_sizes=gca_lib.GCABlockSizes(block_q=block_q), interpret=True))


def test_interpret_bf16():
  inputs = _inputs(7, batch=1, chunks=3, chunk_len=32, heads=2, kv_heads=1, head_dim=32,
                   mem_chunks=3, mem_len=32, k=3, dtype=jnp.bfloat16)
  _compare(gca_lib.gca, *inputs, TOLERANCE["bf16"], scale=32**-0.5, num_keys=31,
           softmax_off_by_one=True, kernel_kw=dict(interpret=True))


@pytest.mark.parametrize("rows,k,group", [(1, 3, 1), (2, 8, 2), (5, 1, 4)])
def test_interpret_decode(rows, k, group):
  q, k_mem, v_mem, indices, weights, _ = _inputs(
      rows, batch=2, chunks=1, chunk_len=rows, heads=2 * group, kv_heads=2, head_dim=32,
      mem_chunks=5, mem_len=32, k=k, dtype=jnp.float32)
  q, indices, weights = q[:, 0], indices[:, 0], weights[:, 0].at[:, 0].set(0.7)
  kw = dict(scale=0.2, num_keys=31, softmax_off_by_one=True)
  got = gca_lib.gca_decode(q, k_mem, v_mem, indices, weights, interpret=True, **kw)
  want = gca_lib.gca_decode_reference(q, k_mem, v_mem, indices, weights, **kw)
  assert got.shape == q.shape
  assert _rel_err(got, want) < TOLERANCE["f32_interpret"]


def test_retrievers_lists_every_valid_slot_once():
  indices = jax.random.randint(jax.random.PRNGKey(3), (2, 9, 5), 0, 6)
  weights = jnp.where(jax.random.uniform(jax.random.PRNGKey(4), (2, 9, 5)) < 0.3, 0.0, 1.0)
  order, starts = gca_lib.retrievers(indices, weights, 6)
  for b in range(2):
    for m in range(6):
      got = sorted(np.asarray(order[b, starts[b, m]:starts[b, m + 1]]).tolist())
      flat_idx, flat_w = np.asarray(indices[b]).ravel(), np.asarray(weights[b]).ravel()
      assert got == [e for e in range(45) if flat_idx[e] == m and flat_w[e] != 0]


def _valid():
  return dict(q=jnp.zeros((1, 2, 32, 2, 32)), k_mem=jnp.zeros((1, 3, 32, 1, 32)),
              v_mem=jnp.zeros((1, 3, 32, 1, 32)), indices=jnp.zeros((1, 2, 3), jnp.int32),
              weights=jnp.zeros((1, 2, 3)))


@pytest.mark.parametrize("change,match", [
    (dict(q=jnp.zeros((1, 2, 48, 2, 32))), "chunk_len=48"),
    (dict(k_mem=jnp.zeros((1, 3, 24, 1, 32)), v_mem=jnp.zeros((1, 3, 24, 1, 32))), "mem_len=24"),
    (dict(k_mem=jnp.zeros((1, 3, 32, 2, 32)), v_mem=jnp.zeros((1, 3, 32, 2, 32)),
          q=jnp.zeros((1, 2, 32, 3, 32))), "heads=3"),
    (dict(indices=jnp.zeros((1, 2, 4), jnp.int32)), "indices"),
    (dict(k_mem=jnp.zeros((1, 3, 32, 1, 32), jnp.bfloat16),
          v_mem=jnp.zeros((1, 3, 32, 1, 32), jnp.bfloat16)), "dtype"),
    (dict(num_keys=33), "num_keys=33"),
    (dict(block_sizes=(64, 4)), "block_sizes"),
])
def test_input_validation(change, match):
  args = {**_valid(), **change}
  with pytest.raises(ValueError, match=match):
    gca_lib.gca(**args, scale=1.0, interpret=True)


@pytest.mark.parametrize("kw,match", [(dict(block_q=24), "block_q=24"),
                                      (dict(num_warps=3), "num_warps=3"),
                                      (dict(num_stages_dkv=0), "num_stages_dkv=0")])
def test_block_sizes_validation(kw, match):
  with pytest.raises(ValueError, match=match):
    gca_lib.GCABlockSizes(**kw)


def test_decode_validation():
  v = _valid()
  with pytest.raises(ValueError, match="rows=0"):
    gca_lib.gca_decode(jnp.zeros((1, 0, 2, 32)), v["k_mem"], v["v_mem"], v["indices"][:, 0],
                       v["weights"][:, 0], scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="batch, k"):
    gca_lib.gca_decode(jnp.zeros((1, 2, 2, 32)), v["k_mem"], v["v_mem"], v["indices"],
                       v["weights"], scale=1.0, interpret=True)


GPU_CASES = [
    # dtype, batch, chunks, chunk_len, heads, kv_heads, head_dim, mem_chunks, k, num_keys, obo
    (jnp.bfloat16, 1, 259, 64, 12, 12, 64, 260, 8, 63, True),  # the paper's training shape
    (jnp.bfloat16, 2, 17, 128, 8, 2, 128, 9, 5, 128, False),
    (jnp.bfloat16, 2, 33, 32, 8, 4, 32, 40, 3, 31, True),
    (jnp.float32, 1, 67, 64, 12, 12, 64, 68, 8, 63, True),
    (jnp.float32, 2, 9, 128, 8, 2, 128, 10, 5, 100, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,batch,chunks,chunk_len,heads,kv_heads,head_dim,mem_chunks,k,"
                         "num_keys,obo", GPU_CASES)
def test_gpu_matches_reference(dtype, batch, chunks, chunk_len, heads, kv_heads, head_dim,
                               mem_chunks, k, num_keys, obo):
  inputs = _inputs(chunks, batch=batch, chunks=chunks, chunk_len=chunk_len, heads=heads,
                   kv_heads=kv_heads, head_dim=head_dim, mem_chunks=mem_chunks,
                   mem_len=chunk_len, k=k, dtype=dtype)
  tol = TOLERANCE["bf16" if dtype == jnp.bfloat16 else "f32_gpu"]
  _compare(jax.jit(gca_lib.gca, static_argnames=("scale", "num_keys", "softmax_off_by_one")),
           *inputs, tol, scale=head_dim**-0.5, num_keys=num_keys, softmax_off_by_one=obo)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2, 16])
def test_gpu_decode(rows):
  assert_decode_matches_reference(gca_lib.gca_decode, rows)


def assert_decode_matches_reference(gca_decode, rows: int):
  """A kernel family's gca_decode (bf16) against the f32 reference at the paper's memory shape."""
  q, k_mem, v_mem, indices, weights, _ = _inputs(
      rows, batch=4, chunks=1, chunk_len=rows, heads=12, kv_heads=12, head_dim=64,
      mem_chunks=260, mem_len=64, k=8, dtype=jnp.bfloat16)
  q, indices, weights = q[:, 0], indices[:, 0], weights[:, 0].at[:, 0].set(0.7)
  kw = dict(scale=0.125, num_keys=63, softmax_off_by_one=True)
  got = gca_decode(q, k_mem, v_mem, indices, weights, **kw)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    want = gca_lib.gca_decode_reference(f32(q), f32(k_mem), f32(v_mem), indices, weights, **kw)
  assert _rel_err(got, want) < TOLERANCE["bf16"]
