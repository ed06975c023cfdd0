"""The first-run check: platform and devices, one tiny step, a refused platform."""

from drt_jax import check


def test_check_runs_a_step_and_refuses_another_platform(capsys):
  assert check.main(["--platform", "cpu"]) == 0
  out = capsys.readouterr().out
  assert "platform cpu: 1 devices" in out and out.rstrip().endswith("ok")
  assert check.main(["--platform", "gpu"]) == 1
  captured = capsys.readouterr()
  assert captured.err.strip().startswith("error: JAX runs on cpu, not gpu")
  assert "training step" not in captured.out  # refused before anything compiles
