"""Test set-up: the repo root on sys.path, and the `gpu` marker (skipped where JAX has no GPU)."""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after sys.path)
import pytest  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run with `make test-gpu` on the device")


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU (make test-gpu)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
