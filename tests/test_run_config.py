"""A run folder describes itself (run_config.py): eval and generate rebuild its config, check every
change against it, and record what they ran."""

import json
import math
import os
import subprocess
import sys

import pytest

from drt_jax import config as config_lib
from drt_jax import eval as eval_lib
from drt_jax import generate as generate_lib
from drt_jax import run_config
from tests.helpers import small_config
from tests.test_generate import save_initial_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(config, folder):
  """A train.py-style run folder: a checkpoint and config.json."""
  save_initial_checkpoint(config, folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2, default=str)
  return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = small_config()
  return config, write_run(config, str(tmp_path_factory.mktemp("run")))


def test_the_saved_config_is_the_trained_one_from_any_checkpoint_path(run):
  config, folder = run
  for path in (folder, os.path.join(folder, "checkpoints"),
               os.path.join(folder, "checkpoints", "1"), os.path.join(folder, "config.json")):
    loaded = run_config.load_saved(path)
    assert run_config.as_json(loaded) == run_config.as_json(config), path
    assert run_config.changes_from_run(loaded, folder) == []
  for path in (folder, os.path.join(folder, "checkpoints", "1")):
    assert run_config.changes_from_run(config, path) == []


def test_a_run_written_before_a_field_existed_loads_with_its_default(run, tmp_path):
  """config.json of an older version lacks later fields: they take configs/base.py's defaults, so
  the run still loads and compares unchanged."""
  _, folder = run
  with open(run_config.saved_config_path(folder)) as f:
    values = json.load(f)
  del values["model"]["landmark_selection"], values["data"]["text_field"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(values, f)
  loaded = run_config.load_saved(str(tmp_path / "config.json"))
  assert loaded.model.landmark_selection == "per_head" and loaded.data.text_field == "text"
  assert run_config.flat(run_config.as_json(loaded)) == run_config.flat(
      run_config.read_saved(run_config.saved_config_path(folder)))


def test_a_run_saved_with_impl_pallas_loads_as_auto(run, tmp_path):
  """impl="pallas" (before the per-op registry) meant the device's kernels: it reads as "auto",
  which validates, and a run evaluated with "auto" reports no change."""
  _, folder = run
  with open(run_config.saved_config_path(folder)) as f:
    values = json.load(f)
  values["model"]["impl"] = "pallas"
  os.makedirs(tmp_path / "old")
  with open(tmp_path / "old" / "config.json", "w") as f:
    json.dump(values, f)
  loaded = run_config.load_saved(str(tmp_path / "old"))
  assert loaded.model.impl == "auto"
  config_lib.validate(loaded)
  assert run_config.changes_from_run(loaded, str(tmp_path / "old")) == []
  loaded.model.impl = "xla"
  assert run_config.changes_from_run(loaded, str(tmp_path / "old")) == [
      "model.impl: 'auto' (trained) -> 'xla'"]


def test_every_kind_of_change_is_said_or_refused(run):
  config, folder = run
  changed = run_config.load_saved(folder)
  changed.data.source = "pystdlib"
  changed.model.impl = "triton"
  assert run_config.changes_from_run(changed, folder) == [
      "data.source: 'pydoc' (trained) -> 'pystdlib'", "model.impl: 'xla' (trained) -> 'triton'"]
  for field, value in [("topk", 2), ("arch", "swa"), ("retrieval", "random"), ("chunk_len", 15),
                       ("window", 20), ("d_model", 64), ("decoder_layers", (1, 2))]:
    changed = run_config.load_saved(folder)
    changed.model[field] = value
    with pytest.raises(run_config.RunConfigError,
                       match=rf"model.{field}=.*: the run was trained with model.{field}=.*; "
                       rf"evaluating a trained model with another model.{field} needs "
                       rf"--allow_change=model.{field}"):
      run_config.changes_from_run(changed, folder)
    assert len(run_config.changes_from_run(changed, folder, [f"model.{field}"])) == 1
  with pytest.raises(run_config.RunConfigError, match="--allow_change='data.source': must name a "
                     "model field"):
    run_config.check_allow_change(["data.source"])


def test_params_that_do_not_match_the_config_name_the_first_parameter(run, tmp_path):
  config, folder = run
  wider = small_config(mlp_dim=48)
  other = write_run(small_config(), str(tmp_path / "other"))
  with open(os.path.join(other, "config.json"), "w") as f:  # a config.json that lies
    json.dump(wider.to_dict(), f, default=str)
  with pytest.raises(generate_lib.CheckpointError, match=r"param \['group_0_0'\]\['mlp'\]"
                     r"\['down'\]\['kernel'\] has shape \(64, 32\), the config's model needs "
                     r"\(48, 32\)"):
    generate_lib.load_run(run_config.load_saved(other), other)


def test_results_hold_the_config_step_and_commit_and_never_nan(run, tmp_path):
  config, folder = run
  out = str(tmp_path / "ppl.json")
  settings = eval_lib.Settings(task="ppl", lengths=(14,), out=out, windows=1, batch=1)
  results = eval_lib.run(run_config.load_saved(folder), folder, settings, progress=False)
  saved = json.loads(open(out).read())
  assert saved["config"] == run_config.as_json(config) and saved["checkpoint_step"] == 1
  assert saved["commit"] == run_config.code_commit() and saved["commit"]
  assert results["arch"] == "drt"
  assert run_config.json_safe({"a": [math.nan, 1.5, {"b": math.inf}], "c": "x"}) == {
      "a": [None, 1.5, {"b": None}], "c": "x"}
  bad = dict(results, results=[{"length": 14, "perplexity": math.inf, "nll": math.nan}])
  eval_lib.write(bad, out)
  assert json.loads(open(out).read())["results"][0] == {"length": 14, "perplexity": None,
                                                        "nll": None}


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def test_cli_takes_the_run_folder_alone_and_names_refused_changes(run, tmp_path):
  _, folder = run
  generate = ["--checkpoint", folder, "--prompt", "Hi", "--max_new_tokens", "3"]
  result = _cli("drt_jax.generate", *generate)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Hi") and "config:" not in result.stderr
  result = _cli("drt_jax.generate", *generate, "--config.model.topk=2")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: model.topk=2: the run was trained with model.topk=3")
  result = _cli("drt_jax.generate", "--config", os.path.join(folder, "config.json"), *generate,
                "--config.model.topk=2", "--allow_change=model.topk", "--top_k=5",
                "--temperature=1")
  assert result.returncode == 0, result.stderr
  assert "config: model.topk: 3 (trained) -> 2" in result.stderr
  for args, message in [(["--top_k=300", "--temperature=1"],
                         "error: top_k=300: must be at most model.vocab_size=259"),
                        (["--chunk_memory=host", "--config.model.arch=swa",
                          "--allow_change=model.arch"],
                         "error: model.arch='swa' with --chunk_memory='host'")]:
    result = _cli("drt_jax.generate", *generate, *args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
  result = _cli("drt_jax.eval", "--checkpoint", folder, "--task", "ppl", "--lengths", "14",
                "--out", str(tmp_path))
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: --out={str(tmp_path)!r}: is a folder")
  assert os.listdir(tmp_path) == []
