"""The first-run check: platform and devices, one tiny step, a refused platform."""

import jax

from drt_jax import check


def test_check_runs_a_step_and_refuses_another_platform(capsys):
  platform = jax.default_backend()
  other = "gpu" if platform == "cpu" else "cpu"
  assert check.main(["--platform", platform]) == 0
  out = capsys.readouterr().out
  assert f"platform {platform}: {jax.device_count()} devices" in out
  assert "model.impl='auto' here: " in out
  assert out.rstrip().endswith("ok")
  assert check.main(["--platform", other]) == 1
  captured = capsys.readouterr()
  assert captured.err.strip().startswith(f"error: JAX runs on {platform}, not {other}")
  assert "training step" not in captured.out  # refused before anything compiles
