"""Test set-up: a shared compilation cache, and the `gpu` marker (skipped where JAX has no GPU).

drt_jax, kernels_pallas and configs come from the installed package (`pip install -e .`, which
`make test` does); `tests` is a package, so pytest puts the repository root on sys.path for it.
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests compile the same small programs many times (and in subprocesses): share compilations.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the cache settings)
import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run with `make test-gpu` on the device")


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU (make test-gpu)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
