"""The per-op kernel registries (model/attention_impls.py): the device's implementation order, the
fallback along it with one log line per reason, and the fallback seen through attention.py."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax import config as config_lib
from drt_jax.model import attention
from drt_jax.model import attention_impls as impls
from kernels_pallas import sliding_window as sw

LOGGER = "drt_jax.model.attention_impls"


@pytest.mark.parametrize("platform,capability,requested,order", [
    ("gpu", "9.0", "auto", ("triton", "xla")),  # H100 / H200: Mosaic not yet the default
    ("gpu", "8.0", "auto", ("triton", "xla")),  # A100
    ("gpu", "8.6", "auto", ("triton", "xla")),
    ("gpu", "7.0", "auto", ("xla",)),
    ("cpu", None, "auto", ("xla",)),
    ("tpu", None, "auto", ("xla",)),
    ("cpu", None, "triton", ("triton", "xla")),  # the Pallas interpreter
    ("cpu", None, "mosaic", ("mosaic", "triton", "xla")),
    ("gpu", "9.0", "triton", ("triton", "xla")),
    ("gpu", "9.0", "xla", ("xla",)),
])
def test_implementation_order_by_device(platform, capability, requested, order):
  assert impls.implementation_order(platform, capability, requested) == order


def test_model_impl_takes_auto_and_every_registered_name():
  assert config_lib.IMPLS == ("auto",) + impls.IMPLS
  with pytest.raises(ValueError, match="impl='pallas' must be 'auto' or one of"):
    impls.implementation_order("gpu", "9.0", "pallas")


def test_every_op_has_the_xla_fallback():
  for op in impls.OPS:
    assert "xla" in op.implementations and op.implementations["xla"].unsupported is None, op.name


def _fake_op():
  """An op whose "triton" entry cannot run head_dim 3 and which has no "mosaic" entry."""
  op = impls.Op("fake_attention")
  op.register("triton", lambda x, *, scale, interpret: ("triton", x * scale, interpret),
              unsupported=lambda x, *, scale: f"head_dim={x.shape[-1]} is odd"
              if x.shape[-1] % 2 else None)
  op.register("xla", lambda x, *, scale: ("xla", x * scale), pallas=False)
  return op


def test_an_unsupported_shape_falls_back_and_logs_once(caplog):
  op = _fake_op()
  order = ("mosaic", "triton", "xla")
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    assert op.choose(order, jnp.ones((2, 4)), scale=2.0) == "triton"
    assert op.choose(order, jnp.ones((2, 3)), scale=2.0) == "xla"
    assert op.choose(order, jnp.ones((5, 3)), scale=2.0) == "xla"  # the same reason again
  lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
  assert lines == [
      "fake_attention: impl 'mosaic' skipped (not implemented); falling back to the next of "
      "('mosaic', 'triton', 'xla')",
      "fake_attention: impl 'triton' skipped (head_dim=3 is odd); falling back to the next of "
      "('mosaic', 'triton', 'xla')"]


def test_select_binds_interpret_off_gpu():
  name, fn = _fake_op().select("triton", jnp.ones((2, 4)), scale=2.0)
  got = fn(jnp.ones((2, 4)), scale=2.0)
  assert name == "triton" and got[2] is (jax.default_backend() != "gpu")
  name, fn = _fake_op().select("xla", jnp.ones((2, 4)), scale=2.0)
  assert name == "xla" and fn(jnp.ones((2, 4)), scale=2.0)[0] == "xla"


def test_kernels_lists_the_kernel_impls_that_run_an_input_and_why_not_the_others():
  op = _fake_op()
  runnable, reasons = op.kernels(jnp.ones((2, 4)), scale=2.0)
  assert list(runnable) == ["triton"] and reasons == {}
  runnable, reasons = op.kernels(jnp.ones((2, 3)), scale=2.0)
  assert runnable == {} and reasons == {"triton": "head_dim=3 is odd"}


def test_registering_checks_the_name_and_refuses_a_second_entry():
  op = _fake_op()
  with pytest.raises(ValueError, match="impl='cudnn' must be one of"):
    op.register("cudnn", lambda x: x)
  with pytest.raises(ValueError, match="impl='triton' is already registered"):
    op.register("triton", lambda x: x)
  with pytest.raises(ValueError, match="'xla' is the plain-JAX fallback"):
    impls.Op("other").register("xla", lambda x: x, unsupported=lambda x: None, pallas=False)


def test_a_shape_the_triton_kernel_cannot_run_takes_the_reference(caplog):
  # head_dim 24 is no power of two: sliding-window attention under impl="triton" runs the
  # reference (exactly, so the outputs are equal) and says why, once.
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (1, 40, 2, 24), jnp.float32) for key in keys)
  slopes = jnp.asarray(sw.alibi_slopes(2), jnp.float32)
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    got = attention.sliding_window(q, k, v, slopes, window=8, scale=0.2, impl="triton")
    attention.sliding_window(q, k, v, slopes, window=8, scale=0.2, impl="triton")
  want = sw.sliding_window_reference(q, k, v, slopes, window=8, scale=0.2)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  lines = [r.getMessage() for r in caplog.records if r.name == LOGGER and "head_dim=24" in
           r.getMessage()]
  assert lines == ["sliding_window_attention: impl 'triton' skipped (head_dim=24 must be a power "
                   "of two in [16, 256]); falling back to the next of ('triton', 'xla')"]


def test_chunk_attention_through_the_gca_kernel_checks_the_gca_limits():
  _, check = impls.chunk_attention_through(lambda *a, **s: None,
                                           lambda q, k, v, i, w, **s: f"rows {q.shape[2]}")
  q = jnp.ones((1, 3, 8, 2, 16))
  assert check(q, q, q, scale=1.0) == "rows 8"
  assert impls.CHUNK_ATTENTION.implementations["triton"].reason(q, q, q, scale=1.0) == (
      "chunk_len=8 must be a power of two in [16, 128]")
