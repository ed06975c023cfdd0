"""drt_jax.compare on two tiny CPU runs: the table, the seed grouping, the plots."""

import csv
import json
import os

import pytest

from drt_jax import compare
from drt_jax import eval as eval_lib
from drt_jax import sweep
from tests.test_sweep import REPO, TINY


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """Two seeds of a tiny run (3 steps each), each with a ppl eval and a passkey results file
  in RUN/eval/."""
  root = tmp_path_factory.mktemp("runs")
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    args = ["--config", "configs/tiny.py", "--name", "s", "--runs_dir", str(root), "--grid",
            "seed=0,1", *[a for s in TINY for a in ("--set", s)], "--set",
            "train.num_train_steps=3", "--set", "train.eval_every=3"]
    assert sweep.main(args) == 0
    for index, folder in enumerate(("seed=0", "seed=1")):
      run = root / "s" / folder
      (run / "eval").mkdir()
      config = sweep.build_config("configs/tiny.py", sweep.plan(["seed=0,1"], [], [
          f"{s}" for s in TINY] + ["train.num_train_steps=3", "train.eval_every=3"])[index])
      eval_lib.run(config, str(run), eval_lib.Settings(
          task="ppl", lengths=(21, 42), out=str(run / "eval" / "ppl.json"), windows=2, batch=2),
          progress=False)
      eval_lib.write({"task": "passkey", "train_len": 42, "settings": {}, "results": [
          {"length": n, "accuracy": a, "needle_retrieved": a, "by_depth": {"0": a}}
          for n, a in ((42, 1.0 - index / 2), (168, 0.5))]}, str(run / "eval" / "passkey.json"))
  finally:
    os.chdir(cwd)
  return root / "s"


def test_table_has_the_differences_metrics_and_every_eval(two_runs, tmp_path):
  assert compare.main([str(two_runs), "--out", str(tmp_path)]) == 0
  with open(tmp_path / "compare.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["seed=0", "seed=1"]
  assert [r["seed"] for r in rows] == ["0", "1"]
  # Only the differing config field is a column; every eval file and length is one.
  assert not any(h.startswith("model.") for h in rows[0])
  for r in rows:
    assert r["steps"] == "3" and r["train tokens"] == str(3 * 2 * 42)
    assert float(r["train_loss"]) > 0 and float(r["eval_loss"]) > 0
    assert float(r["ppl@21"]) > 1 and float(r["ppl@42"]) > 1 and float(r["step time (ms)"]) > 0
  assert [r["passkey@42"] for r in rows] == ["1.0", "0.5"]
  assert [r["passkey retrieved@168"] for r in rows] == ["0.5", "0.5"]
  ppl = json.loads((two_runs / "seed=1" / "eval" / "ppl.json").read_text())
  assert float(rows[1]["ppl@42"]) == pytest.approx(ppl["results"][1]["perplexity"])
  text = (tmp_path / "compare.md").read_text()
  assert "| run | seed |" in text and "Mean over seeds" in text
  assert "| seed=0, seed=1 | 0, 1 |" in text
  assert "0.75 ± 0.25" in text  # passkey@42 over the two seeds
  assert {"loss.png", "perplexity.png", "accuracy.png", "compare.json"} <= set(os.listdir(tmp_path))


def test_bad_run_folders_are_named(tmp_path, capsys):
  assert compare.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
  assert f"error: {tmp_path}: neither a run folder" in capsys.readouterr().err
