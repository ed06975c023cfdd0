"""Pallas sliding-window attention (kernels_pallas/sliding_window.py) against its JAX reference.

CPU: interpret mode, float32, small shapes (rel err < 1e-5, forward and gradients). GPU (`-m gpu`):
the bench shape in bf16 (rel err < 1e-2) and one 65536-position sequence.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from kernels_pallas import sliding_window as sw

# Different tiles per kernel, so that the three kernels cut the sequence at different places.
SMALL = sw.SlidingWindowBlockSizes(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16,
                                   block_q_dq=32, block_k_dq=16)
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_err(x, ref):
  """||x - ref|| / ||ref||. The denominator is floored at RMS 0.1 (the inputs have RMS 1; real
  outputs and gradients here have RMS >= 0.25) so that the identically zero dq, dk of window = 0
  compare at float32 rounding instead of dividing by zero."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 0.1 * np.sqrt(ref.size))


def random_inputs(seed, batch, length, heads, kv_heads, head_dim, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.float32)
  k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), jnp.float32)
  do = jax.random.normal(keys[3], (batch, length, heads, head_dim), jnp.float32)
  return tuple(x.astype(dtype) for x in (q, k, v, do))


def kernel_and_reference(q, k, v, do, slopes, window, block_sizes, interpret,
                         attention=sw.sliding_window_attention):
  """(out, dq, dk, dv) of a kernel family's sliding_window_attention (the Triton one by default)
  and of the f32 reference on the same (upcast) inputs."""
  scale = q.shape[-1] ** -0.5
  kernel = lambda q, k, v: attention(
      q, k, v, slopes, window=window, scale=scale, block_sizes=block_sizes, interpret=interpret)
  reference = lambda q, k, v: sw.sliding_window_reference(q, k, v, slopes, window=window,
                                                          scale=scale)
  out, vjp = jax.vjp(kernel, q, k, v)
  got = (out, *vjp(do))
  with jax.default_matmul_precision("highest"):
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    out, vjp = jax.vjp(reference, *f32[:3])
    want = (out, *vjp(f32[3]))
  return got, want


def slopes_for(heads, alibi):
  return jnp.asarray(sw.alibi_slopes(heads), jnp.float32) if alibi else None


# (batch, length, heads, kv_heads, head_dim, window, alibi): lengths off the 32-multiple, window
# 0 / smaller than / equal to / larger than the length, GQA groups 1, 2, 3, head_dim 32 and 64.
CASES = [
    (2, 100, 4, 2, 32, 40, True),
    (1, 77, 2, 2, 64, 0, False),
    (1, 50, 3, 1, 32, 100, True),
    (1, 96, 2, 1, 32, 96, True),
    (1, 64, 2, 2, 32, 17, False),
    (1, 200, 2, 1, 64, 33, True),
]


@pytest.mark.parametrize("batch,length,heads,kv_heads,head_dim,window,alibi", CASES)
def test_matches_reference_interpret(batch, length, heads, kv_heads, head_dim, window, alibi):
  q, k, v, do = random_inputs(length + window, batch, length, heads, kv_heads, head_dim)
  got, want = kernel_and_reference(q, k, v, do, slopes_for(heads, alibi), window, SMALL, True)
  for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.shape == ref.shape and x.dtype == jnp.float32
    assert rel_err(x, ref) < TOLERANCE[jnp.float32], name


def test_bf16_interpret():
  q, k, v, do = random_inputs(7, 1, 80, 2, 1, 32, jnp.bfloat16)
  got, want = kernel_and_reference(q, k, v, do, slopes_for(2, True), 24, SMALL, True)
  for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.dtype == jnp.bfloat16
    assert rel_err(x, ref) < TOLERANCE[jnp.bfloat16], name


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_never_attends_outside_window(impl):
  """Perturbing keys/values [a, a + m) must leave every row whose window misses them unchanged
  (rows before a: later keys; rows after a + m - 1 + window: keys older than the window)."""
  length, window, a, m = 120, 20, 50, 10
  q, k, v, _ = random_inputs(3, 1, length, 2, 1, 32)
  kwargs = dict(window=window, scale=32 ** -0.5)
  attend = {"kernel": lambda q, k, v: sw.sliding_window_attention(
                q, k, v, slopes_for(2, True), block_sizes=SMALL, interpret=True, **kwargs),
            "reference": lambda q, k, v: sw.sliding_window_reference(
                q, k, v, slopes_for(2, True), **kwargs)}[impl]
  noise = jax.random.normal(jax.random.PRNGKey(4), (2, 1, m, 1, 32)) * 100.0
  k2 = k.at[:, a:a + m].add(noise[0])
  v2 = v.at[:, a:a + m].add(noise[1])
  before, after = np.asarray(attend(q, k, v)), np.asarray(attend(q, k2, v2))
  untouched = np.r_[0:a, a + m + window:length]
  np.testing.assert_array_equal(after[:, untouched], before[:, untouched])
  touched = np.arange(a, a + m + window)
  assert np.all(np.abs(after[:, touched] - before[:, touched]).max(axis=(0, 2, 3)) > 1e-3)


def test_block_ranges_cover_window():
  """The three loop ranges hold exactly the tiles with a visible pair; the middle one only tiles
  without a masked pair."""
  length = 256
  pos = np.arange(length)
  for block_q, block_k in [(16, 32), (32, 16), (32, 32)]:
    for window in [0, 1, 15, 16, 31, 47, 100, 255, 300]:
      visible = ((pos[:, None] - pos[None, :] >= 0) & (pos[:, None] - pos[None, :] <= window))
      tiles = visible.reshape(length // block_q, block_q, length // block_k, block_k)
      any_visible, all_visible = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))
      for qb in range(length // block_q):
        lo, mid_lo, mid_hi, hi = (int(x) for x in sw.key_blocks(
            jnp.int32(qb * block_q), block_q, block_k, window))
        assert lo <= mid_lo <= mid_hi <= hi
        assert set(np.flatnonzero(any_visible[qb])) <= set(range(lo, hi))
        assert all_visible[qb, mid_lo:mid_hi].all()
      for kb in range(length // block_k):
        lo, mid_lo, mid_hi, hi = (int(x) for x in sw.query_blocks(
            jnp.int32(kb * block_k), block_k, block_q, window, length // block_q))
        assert lo <= mid_lo <= mid_hi <= hi
        assert set(np.flatnonzero(any_visible[:, kb])) <= set(range(lo, hi))
        assert all_visible[mid_lo:mid_hi, kb].all()


def ring_cache(k, v, positions, cache_len):
  """Caches holding positions (p - cache_len, p] of each sequence at slot p % cache_len; slots
  never written (p < 0) hold NaN, which must be ignored."""
  batch, _, kv_heads, head_dim = k.shape
  k_cache = np.full((batch, cache_len, kv_heads, head_dim), np.nan, np.float32)
  v_cache = k_cache.copy()
  for b, p in enumerate(positions):
    held = np.arange(max(0, p - cache_len + 1), p + 1)
    k_cache[b, held % cache_len] = np.asarray(k)[b, held]
    v_cache[b, held % cache_len] = np.asarray(v)[b, held]
  return jnp.asarray(k_cache), jnp.asarray(v_cache)


def decode_and_full_sequence(decode, q, k, v, slopes, positions, *, window, cache_len, **kwargs):
  """(decode's step for each sequence's query at its position, from ring caches of cache_len
  slots in k's dtype, never-written slots NaN; the float32 full-sequence forward there). q, k, v
  are whole sequences; kwargs go to decode."""
  scale = q.shape[-1] ** -0.5
  with jax.default_matmul_precision("highest"):
    full = sw.sliding_window_reference(*(x.astype(jnp.float32) for x in (q, k, v)), slopes,
                                       window=window, scale=scale)
  k_cache, v_cache = ring_cache(k.astype(jnp.float32), v.astype(jnp.float32), positions, cache_len)
  rows = np.arange(len(positions))
  got = decode(q[rows, positions], k_cache.astype(k.dtype), v_cache.astype(v.dtype), slopes,
               window=window, scale=scale, position=jnp.asarray(positions), **kwargs)
  return got, full[rows, positions]


@pytest.mark.parametrize("window,cache_len,kv_heads,alibi", [(20, 21, 2, True), (30, 40, 1, False)])
def test_decode_matches_full_sequence(window, cache_len, kv_heads, alibi):
  length, heads, head_dim = 90, 4, 32
  q, k, v, _ = random_inputs(window, 4, length, heads, kv_heads, head_dim)
  args = (q, k, v, slopes_for(heads, alibi), np.array([length - 1, 10, 0, cache_len + 3]))
  got, want = decode_and_full_sequence(sw.sliding_window_decode, *args, window=window,
                                       cache_len=cache_len, block_sizes=SMALL, interpret=True)
  ref, _ = decode_and_full_sequence(sw.sliding_window_decode_reference, *args, window=window,
                                    cache_len=cache_len)
  assert rel_err(ref, want) < 1e-5
  assert rel_err(got, want) < 1e-5


def test_invalid_inputs():
  q, k, v, _ = random_inputs(0, 1, 32, 2, 1, 32)
  with pytest.raises(ValueError, match="window=-1"):
    sw.sliding_window_attention(q, k, v, window=-1, scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="head_dim=24"):
    sw.sliding_window_attention(q[..., :24], k[..., :24], v[..., :24], window=4, scale=1.0)
  with pytest.raises(ValueError, match=r"slopes shape \(3,\)"):
    sw.sliding_window_attention(q, k, v, jnp.ones(3), window=4, scale=1.0)
  with pytest.raises(ValueError, match="block_k_dq=24"):
    sw.SlidingWindowBlockSizes(block_k_dq=24)
  with pytest.raises(ValueError, match="cache_len=8"):
    sw.sliding_window_decode(q[:, 0], k[:, :8], v[:, :8], window=8, scale=1.0,
                             position=jnp.zeros(1, jnp.int32))


def test_block_sizes_for_cpu_are_defaults():
  assert sw.SlidingWindowBlockSizes.for_device() == sw.SlidingWindowBlockSizes()


@pytest.mark.gpu
@pytest.mark.parametrize("batch,length,heads,kv_heads,head_dim,dtype,alibi", [
    (4, 16640, 12, 12, 64, jnp.bfloat16, True),  # the DRT training shape (bench/sliding_window.py)
    (1, 65536, 12, 12, 64, jnp.bfloat16, True),  # long sequences broke Triton attention elsewhere
    (2, 1000, 8, 2, 128, jnp.bfloat16, False),
    (2, 700, 4, 4, 32, jnp.float32, True),
])
def test_matches_reference_gpu(batch, length, heads, kv_heads, head_dim, dtype, alibi):
  q, k, v, do = random_inputs(length, batch, length, heads, kv_heads, head_dim, dtype)
  got, want = kernel_and_reference(q, k, v, do, slopes_for(heads, alibi), 512, None, False)
  for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
    assert bool(jnp.isfinite(x).all()), name
    assert rel_err(x, ref) < TOLERANCE[dtype], name


@pytest.mark.gpu
def test_decode_gpu():
  length, heads, head_dim, window = 1500, 12, 64, 512
  q, k, v, _ = random_inputs(1, 4, length, heads, heads, head_dim, jnp.bfloat16)
  got, want = decode_and_full_sequence(sw.sliding_window_decode, q, k, v, slopes_for(heads, True),
                                       np.array([length - 1, 100, 0, 700]), window=window,
                                       cache_len=window + 1)
  assert rel_err(got, want) < TOLERANCE[jnp.bfloat16]
