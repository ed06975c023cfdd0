"""The model's kernel path, impl="triton" (the Pallas interpreter on CPU), against impl="xla"."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax.model import attention, lm
from tests.helpers import model_config, random_tokens, small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_triton_path_matches_xla_path_forward_and_gradients():
  config = small_config(chunk_len=31, window=40, topk=2)  # S = 32: a kernel tile size
  config.data.seq_len = 31 * 4
  xla = lm.make_model(model_config(config))
  config.model.impl = "triton"
  pallas = lm.make_model(model_config(config))
  params = nn.meta.unbox(lm.init_params(xla, jax.random.key(0), 1, config.data.seq_len))
  tokens = random_tokens(3, 2, config.data.seq_len)

  def loss(model, p):
    total, count = lm.loss_terms(model, p, tokens, train=True, rng=jax.random.key(1))
    return total / count

  (loss_xla, grads_xla) = jax.value_and_grad(lambda p: loss(xla, p))(params)
  (loss_pallas, grads_pallas) = jax.value_and_grad(lambda p: loss(pallas, p))(params)
  np.testing.assert_allclose(float(loss_pallas), float(loss_xla), rtol=1e-5)
  for path, g_xla in jax.tree_util.tree_leaves_with_path(grads_xla):
    g_pallas = dict(jax.tree_util.tree_leaves_with_path(grads_pallas))[path]
    error = np.linalg.norm(g_pallas - g_xla) / max(np.linalg.norm(g_xla), 1e-12)
    assert error < 1e-4, (jax.tree_util.keystr(path), error)


def _chunk_attention_errors(shape, dtype):
  """||kernel - XLA|| / ||XLA|| of chunk_attention's output and q, k, v gradients; XLA's on the
  float32 upcast of the same inputs, at the highest matmul precision."""
  keys = jax.random.split(jax.random.key(4), 4)
  q, k, v, do = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)

  def run(impl, *inputs):
    out, vjp = jax.vjp(lambda q, k, v: attention.chunk_attention(
        q, k, v, scale=shape[-1] ** -0.5, impl=impl), *inputs)
    return (out, *vjp(do.astype(out.dtype)))

  with jax.default_matmul_precision("highest"):
    want = run("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
  got = jax.jit(lambda q, k, v: run("triton", q, k, v))(q, k, v)
  return {name: float(np.linalg.norm(np.asarray(g, np.float64) - np.asarray(w, np.float64))
                      / np.linalg.norm(np.asarray(w, np.float64)))
          for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}


def test_chunk_attention_kernel_matches_the_einsum_softmax():
  # The encoder's attention through FlashGCA (each chunk retrieving itself) against XLA's
  # einsum + softmax, float32 (interpret mode on CPU). Shape: b, n, S, heads, head_dim.
  errors = _chunk_attention_errors((2, 3, 32, 2, 16), jnp.float32)
  assert max(errors.values()) < 1e-5, errors


@pytest.mark.gpu
def test_gpu_chunk_attention_at_the_paper_shape():
  # The encoder of configs/drt_pg19.py at batch 1: 260 chunks of 64 rows, 12 heads of 64, bf16.
  errors = _chunk_attention_errors((1, 260, 64, 12, 64), jnp.bfloat16)
  assert errors["out"] < 1e-2 and max(errors.values()) < 2e-2, errors


_SHARDED_PALLAS_STEP = """
import jax, numpy as np
from drt_jax import config as config_lib, train_lib
from tests.helpers import small_config
config = small_config(chunk_len=31, window=40, topk=2, impl="{impl}")
config.data.seq_len = 31 * 4
config.train.global_batch_size = 4
config.mesh.data, config.mesh.fsdp = 2, 2
trainer = train_lib.Trainer(config, config_lib.validate(config), train_lib.make_mesh(config.mesh))
state = trainer.init_state(0)
tokens = np.random.default_rng(0).integers(0, 257, (4, 124), dtype=np.int32)
batch = trainer.global_batch({{"inputs": tokens}})
state, metrics = trainer.compile_train_step(state, batch)(state, batch)
print(repr(float(metrics["loss"])))
"""


def test_pallas_kernels_run_per_shard_on_a_data_fsdp_mesh():
  # Kernels run under shard_map on a 2 x 2 mesh (and the batch-1 init trace runs whole).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  losses = {}
  for impl in ("xla", "triton"):
    script = _SHARDED_PALLAS_STEP.format(impl=impl)
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, timeout=600,
                            capture_output=True, text=True, check=True)
    losses[impl] = float(result.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(losses["triton"], losses["xla"], rtol=1e-5)
