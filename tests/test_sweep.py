"""drt_jax.sweep: one run folder per combination, resume and skip, dry run, bad input."""

import json
import os
import types

import pytest

from drt_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/tiny.py shrunk to a CPU model that trains a few steps in seconds.
TINY = ["model.d_model=32", "model.num_heads=2", "model.num_kv_heads=2", "model.mlp_dim=64",
        "model.decoder_layers=(1,1)", "model.chunk_len=7", "model.window=12", "data.seq_len=42",
        "train.global_batch_size=2", "train.warmup_steps=1", "train.log_every=1",
        "train.eval_every=100", "train.eval_batches=1", "train.checkpoint_every=100"]


@pytest.fixture(autouse=True)
def _in_the_repository(monkeypatch):
  monkeypatch.chdir(REPO)  # configs/ and drt_jax/ as the CLI sees them from the repository root


def _sweep(tmp_path, capfd, *args):
  """Runs the sweep CLI in this process (training still runs in its subprocesses)."""
  sets = [a for s in TINY for a in ("--set", s)]
  code = sweep.main(["--config", "configs/tiny.py", "--name", "s", "--runs_dir", str(tmp_path),
                     *sets, *args])
  out, err = capfd.readouterr()
  return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_grid_values_split_at_top_level_commas_only():
  assert sweep.split_values("4,8") == ["4", "8"]
  assert sweep.split_values("(2,2),(2,1,1)") == ["(2,2)", "(2,1,1)"]
  assert sweep.split_values("'a,b',c") == ["'a,b'", "c"]


def test_plan_is_the_product_with_readable_unique_labels():
  runs = sweep.plan(["model.topk=4,8", "model.retrieval=learned,random"],
                    ["one: model.decoder_layers=(2,2)", "two: model.decoder_layers=(2,1,1)"],
                    ["seed=3"])
  assert [r.label for r in runs[:4]] == [
      "one_topk=4_retrieval=learned", "one_topk=4_retrieval=random",
      "one_topk=8_retrieval=learned", "one_topk=8_retrieval=random"]
  assert runs[7].label == "two_topk=8_retrieval=random" and runs[7].index == 7
  assert runs[7].assignments == ("seed=3", "model.decoder_layers=(2,1,1)", "model.topk=8",
                                 "model.retrieval=random")
  # Two axes with the same last name are told apart by their whole path.
  assert [r.label for r in sweep.plan(["model.topk=1", "train.topk=2"], [], [])] == [
      "model-topk=1_train-topk=2"]
  assert sweep.build_config("configs/tiny.py", runs[7]).model.decoder_layers == (2, 1, 1)


def test_sweep_trains_each_combination_in_its_folder_then_resumes_and_skips(tmp_path, capfd):
  result = _sweep(tmp_path, capfd, "--grid", "model.topk=1,2", "--set", "train.num_train_steps=2")
  assert result.returncode == 0, result.stderr
  folders = {"topk=1", "topk=2"}
  assert set(os.listdir(tmp_path / "s")) == folders | {"sweep.json"}
  for name, topk in (("topk=1", 1), ("topk=2", 2)):
    run = tmp_path / "s" / name
    assert json.loads((run / "config.json").read_text())["model"]["topk"] == topk
    assert "--config.model.topk=%d\n" % topk in (run / "overrides.txt").read_text()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2
  recorded = json.loads((tmp_path / "s" / "sweep.json").read_text())["runs"]
  assert list(recorded) == ["topk=1", "topk=2"] and "model.topk=2" in recorded["topk=2"]

  # The same command again: both finished, both skipped without starting training.
  result = _sweep(tmp_path, capfd, "--grid", "model.topk=1,2", "--set", "train.num_train_steps=2")
  assert result.returncode == 0 and result.stdout.count("done, skipped") == 2, result.stdout
  # Another --set under the same name is refused: sweep.json records what the folders hold.
  result = _sweep(tmp_path, capfd, "--grid", "model.topk=1,2", "--set", "train.num_train_steps=3",
                  "--index", "1")
  assert result.returncode == 2 and "run topk=2 was trained with" in result.stderr
  # Once allowed, more steps for run 1 alone (--index) resume it from its step-2 checkpoint.
  os.remove(tmp_path / "s" / "sweep.json")
  result = _sweep(tmp_path, capfd, "--grid", "model.topk=1,2", "--set", "train.num_train_steps=3",
                  "--index", "1")
  assert result.returncode == 0, result.stderr
  assert "resuming at step 2" in result.stdout and "topk=1:" not in result.stdout
  steps = [json.loads(line)["step"] for line in
           (tmp_path / "s" / "topk=2" / "metrics.jsonl").read_text().splitlines()]
  assert max(steps) == 3
  listing = _sweep(tmp_path, capfd, "--grid", "model.topk=1,2", "--set", "train.num_train_steps=3",
                   "--dry_run").stdout.splitlines()
  assert listing[0].split()[:3] == ["0", "step", "2"] and listing[1].split()[:2] == ["1", "done"]
  assert "sbatch --array=0-1 launch/sweep.sbatch" in listing[2]


def test_dry_run_lists_runs_with_their_index_and_trains_nothing(tmp_path, capfd):
  result = _sweep(tmp_path, capfd, "--grid", "model.topk=1,2", "--grid",
                  "model.retrieval=learned,random",
                  "--dry_run")
  assert result.returncode == 0, result.stderr
  rows = [line.split() for line in result.stdout.splitlines()[:4]]
  assert [(r[0], r[1], os.path.basename(r[2])) for r in rows] == [
      ("0", "new", "topk=1_retrieval=learned"), ("1", "new", "topk=1_retrieval=random"),
      ("2", "new", "topk=2_retrieval=learned"), ("3", "new", "topk=2_retrieval=random")]
  assert result.stdout.splitlines()[4].startswith("4 runs")
  assert not os.path.exists(tmp_path / "s")


@pytest.mark.parametrize("args,message", [
    (["--grid", "model.topk=0,2"],
     "error: run 0 (topk=0): model.topk=0: must be a positive integer"),
    (["--grid", "model.topx=1,2"], "model.topx is not a config field"),
    (["--grid", "modelx.topk=1"], "modelx.topk is not a config field"),
    (["--grid", "model.topk=a,2"], "model.topk must be a int (got 'a')"),
    (["--grid", "model.topk"], "--grid 'model.topk': expected field=value1,value2"),
    (["--grid", "model.topk=1,1"], "a value is repeated"),
    (["--grid", "model.topk=1,2", "--index", "2"], "--index=2: the sweep has runs 0..1"),
    (["--variant", "no label"], "expected 'label: field=value ...'"),
    (["--grid", "data.source=web"], "data.source='web': must be one of"),
])
def test_bad_input_fails_in_one_line_before_anything_runs(tmp_path, capfd, args, message):
  result = _sweep(tmp_path, capfd, *args)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / "s")
