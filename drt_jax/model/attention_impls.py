"""Which implementation runs each attention op: one registry per op, chosen by device.

`model.impl` requests "auto" | "mosaic" | "triton" | "xla". "auto" picks by the local device
(`implementation_order`): Pallas-Triton kernels on compute capability 9.x (Hopper; Mosaic GPU
once it passes the train-step parity check) and 8.x (Ampere), the plain-JAX references of
kernels_pallas anywhere else (CPU). An explicit "mosaic" or "triton" runs those kernels on any
platform, in the Pallas interpreter off-GPU (how the kernel tests and CPU CI run them).

Each op's registry maps implementation names to functions with one signature: the op's arrays
positionally, its static settings as keywords, and, for a Pallas kernel, `interpret: bool`. An
implementation may declare a support check taking the same arguments (without `interpret`) and
returning one line saying why it cannot run them, or None. Where the chosen implementation is
missing for an op or does not support its inputs, the op falls back along mosaic -> triton ->
xla and logs the reason once per (op, implementation, reason). "xla" supports everything.

Full causal attention has no Pallas kernel: both GPU implementations ("mosaic" and "triton") are
cuDNN's fused attention (jax.nn.dot_product_attention), which takes 16-bit inputs on a GPU only.
Chunk attention (the encoder's, §2.4) is GCA with one slot per chunk retrieving itself.

attention.py is where the model asks an op's registry for an implementation and runs it; the
benches read the registries to time every implementation.
"""

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels_pallas import gca as gca_triton
from kernels_pallas import gca_mosaic
from kernels_pallas import sliding_window as sliding_window_triton
from kernels_pallas import sliding_window_mosaic

IMPLS = ("mosaic", "triton", "xla")  # the fallback order; model.impl also takes "auto"

_log = logging.getLogger(__name__)
_logged: set[tuple[str, str, str]] = set()


def implementation_order(platform: str, compute_capability: str | None,
                         requested: str) -> tuple[str, ...]:
  """The implementations to try, best first, for model.impl=requested on this device.

  platform: jax.default_backend() ("gpu", "cpu", ...); compute_capability: the GPU's, e.g. "9.0"
  (None off-GPU).
  """
  if requested == "auto":
    major = str(compute_capability or "").split(".")[0] if platform == "gpu" else ""
    # Hopper stays on Triton until the Mosaic kernels pass bench/impl_parity.py on a whole train
    # step: measured on an H200 (2026-12-04) Mosaic GCA is faster but Mosaic sliding window slower.
    requested = {"9": "triton", "8": "triton"}.get(major, "xla")
  if requested not in IMPLS:
    raise ValueError(f"impl={requested!r} must be 'auto' or one of " + ", ".join(map(repr, IMPLS)))
  return IMPLS[IMPLS.index(requested):]


def local_device() -> tuple[str, str | None]:
  """(platform, compute capability) of the default device, as implementation_order takes them."""
  return jax.default_backend(), getattr(jax.devices()[0], "compute_capability", None)


@dataclasses.dataclass(frozen=True)
class Implementation:
  """fn: the op's function. unsupported: its support check (None: supports every input).
  pallas: fn is a Pallas kernel, so it takes `interpret`."""
  fn: Callable
  unsupported: Callable[..., str | None] | None = None
  pallas: bool = True

  def reason(self, *args, **settings) -> str | None:
    return None if self.unsupported is None else self.unsupported(*args, **settings)


class Op:
  """The implementations of one attention op, by name (one of IMPLS)."""

  def __init__(self, name: str):
    self.name = name
    self.implementations: dict[str, Implementation] = {}

  def register(self, impl: str, fn: Callable, *, unsupported: Callable[..., str | None] | None
               = None, pallas: bool = True):
    if impl not in IMPLS:
      raise ValueError(f"{self.name}: impl={impl!r} must be one of " + ", ".join(map(repr, IMPLS)))
    if impl in self.implementations:
      raise ValueError(f"{self.name}: impl={impl!r} is already registered")
    if impl == "xla" and (pallas or unsupported is not None):
      raise ValueError(f"{self.name}: 'xla' is the plain-JAX fallback: it supports every input "
                       "and is no Pallas kernel")
    self.implementations[impl] = Implementation(fn, unsupported, pallas)

  def choose(self, order: tuple[str, ...], *args, **settings) -> str:
    """The first implementation in `order` that exists and supports these inputs; logs why each
    one before it was passed over."""
    for impl in order:
      entry = self.implementations.get(impl)
      reason = "not implemented" if entry is None else entry.reason(*args, **settings)
      if reason is None:
        return impl
      if (self.name, impl, reason) not in _logged:
        _logged.add((self.name, impl, reason))
        _log.warning("%s: impl %r skipped (%s); falling back to the next of %s", self.name, impl,
                     reason, order)
    raise ValueError(f"{self.name}: none of {order} supports these inputs")

  def kernels(self, *args, **settings) -> tuple[dict[str, Implementation], dict[str, str]]:
    """({name: implementation} of the kernel impls (all but "xla") that run these inputs,
    {name: why not} of those that do not): what a bench times."""
    runnable, reasons = {}, {}
    for name, entry in self.implementations.items():
      if name == "xla":
        continue
      reason = entry.reason(*args, **settings)
      if reason is None:
        runnable[name] = entry
      else:
        reasons[name] = reason
    return runnable, reasons

  def select(self, requested: str, *args, **settings) -> tuple[str, Callable]:
    """(name, fn) of the implementation for model.impl=requested on the local device and these
    inputs; fn takes the op's arrays and settings (a Pallas kernel's `interpret` bound: True
    off-GPU)."""
    platform, capability = local_device()
    impl = self.choose(implementation_order(platform, capability, requested), *args, **settings)
    entry = self.implementations[impl]
    fn = functools.partial(entry.fn, interpret=platform != "gpu") if entry.pallas else entry.fn
    return impl, fn


SLIDING_WINDOW = Op("sliding_window_attention")  # (q, k, v[, slopes], *, window, scale)
SLIDING_WINDOW_DECODE = Op("sliding_window_decode")  # (q, k_cache, v_cache[, slopes], *, window,
#                                                       scale, position)
GCA = Op("gca")  # (q, k_mem, v_mem, indices, weights, *, scale, num_keys, softmax_off_by_one)
GCA_DECODE = Op("gca_decode")  # gca's, q [b, rows, heads, d] and indices/weights [b, k]
CHUNK_ATTENTION = Op("chunk_attention")  # (q, k, v, *, scale), each [b, n, s, heads, d]
CAUSAL_ATTENTION = Op("causal_attention")  # (q, k, v, *, scale)
OPS = (SLIDING_WINDOW, SLIDING_WINDOW_DECODE, GCA, GCA_DECODE, CHUNK_ATTENTION, CAUSAL_ATTENTION)


def chunk_attention_reference(q, k, v, *, scale: float):
  """Every chunk's rows over the same chunk's rows, bidirectional; softmax in float32."""
  logits = jnp.einsum("bnshd,bnthd->bnhst", q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * scale, axis=-1)
  return jnp.einsum("bnhst,bnthd->bnshd", probs.astype(v.dtype), v)


def _self_retrieval(q):
  """indices, weights [b, n, 1]: chunk n retrieves itself with weight 1."""
  batch, chunks = q.shape[:2]
  itself = jnp.broadcast_to(jnp.arange(chunks, dtype=jnp.int32)[None, :, None], (batch, chunks, 1))
  return itself, jnp.ones((batch, chunks, 1), jnp.float32)


def chunk_attention_through(gca: Callable, unsupported: Callable[..., str | None] | None = None):
  """(fn, unsupported) of chunk attention run by a GCA kernel `gca` (and its support check): one
  slot per chunk, every row a key, no off-by-one, which is the softmax above exactly. The kernel
  keeps the logits on chip and reads q, k, v in this layout, where the einsums would transpose
  them and write the float32 [b, n, heads, s, s] logits and probabilities, in both passes."""
  def settings(q, scale):
    return dict(scale=scale, num_keys=q.shape[2], softmax_off_by_one=False)

  def fn(q, k, v, *, scale: float, interpret: bool):
    return gca(q, k, v, *_self_retrieval(q), interpret=interpret, **settings(q, scale))

  def check(q, k, v, *, scale: float):
    return None if unsupported is None else unsupported(q, k, v, *_self_retrieval(q),
                                                        **settings(q, scale))
  return fn, check


def _cudnn_causal(q, k, v, *, scale: float):
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")


def _cudnn_unsupported(q, k, v, *, scale: float) -> str | None:
  if jax.default_backend() != "gpu":
    return "cuDNN needs a GPU"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN's fused attention takes bfloat16/float16, not {q.dtype}"
  return None


def _xla_causal(q, k, v, *, scale: float):
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="xla")


def register_kernel_modules(impl: str, gca_module, sliding_window_module):
  """Registers a family of Pallas kernels under `impl` for the five ops they serve, from two
  modules laid out like kernels_pallas/gca.py and kernels_pallas/sliding_window.py:
  gca_module: gca, gca_decode, unsupported_reason (gca's arguments), decode_unsupported_reason
  (gca_decode's arguments); sliding_window_module: sliding_window_attention, unsupported_reason
  (either function's arguments) and, where the family has one, sliding_window_decode (without
  it, decoding falls back to the next implementation). Chunk attention is the GCA kernel with
  self-retrieval."""
  sw = sliding_window_module
  SLIDING_WINDOW.register(impl, sw.sliding_window_attention, unsupported=sw.unsupported_reason)
  if hasattr(sw, "sliding_window_decode"):
    SLIDING_WINDOW_DECODE.register(impl, sw.sliding_window_decode,
                                   unsupported=sw.unsupported_reason)
  GCA.register(impl, gca_module.gca, unsupported=gca_module.unsupported_reason)
  GCA_DECODE.register(impl, gca_module.gca_decode,
                      unsupported=gca_module.decode_unsupported_reason)
  fn, check = chunk_attention_through(gca_module.gca, gca_module.unsupported_reason)
  CHUNK_ATTENTION.register(impl, fn, unsupported=check)


def _register_builtin():
  # Kernels (run in the Pallas interpreter off-GPU), then the plain-JAX references.
  register_kernel_modules("mosaic", gca_mosaic, sliding_window_mosaic)
  register_kernel_modules("triton", gca_triton, sliding_window_triton)
  for impl in ("mosaic", "triton"):
    CAUSAL_ATTENTION.register(impl, _cudnn_causal, unsupported=_cudnn_unsupported, pallas=False)

  SLIDING_WINDOW.register("xla", sliding_window_triton.sliding_window_reference, pallas=False)
  SLIDING_WINDOW_DECODE.register("xla", sliding_window_triton.sliding_window_decode_reference,
                                 pallas=False)
  GCA.register("xla", gca_triton.gca_reference, pallas=False)
  GCA_DECODE.register("xla", gca_triton.gca_decode_reference, pallas=False)
  CHUNK_ATTENTION.register("xla", chunk_attention_reference, pallas=False)
  CAUSAL_ATTENTION.register("xla", _xla_causal, pallas=False)


_register_builtin()
