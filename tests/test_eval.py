"""drt_jax.eval: retrieval accuracy and perplexity harness, outputs, bad input."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax import config as config_lib
from drt_jax import eval as eval_lib
from drt_jax import generate as generate_lib
from drt_jax.data import DataError
from drt_jax.data import sources
from drt_jax.data import tasks as tasks_lib
from drt_jax.data import tokenizer as tokenizer_lib
from drt_jax.model import lm
from tests.helpers import small_config
from tests.test_generate import save_initial_checkpoint
from tests.test_tasks import TOKENIZER, _haystack, copy_the_needle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Passkey needs >= 71 tokens at chunk_len 7; both lengths give 71-token prompts (one compile).
PASSKEY_LENGTHS = (78, 79)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """small_config (chunk_len 7, byte tokens, pydoc) and a checkpoint of its initial params."""
  folder = tmp_path_factory.mktemp("run")
  config = small_config()
  params = save_initial_checkpoint(config, str(folder))
  return config, str(folder), params


def test_lengths_must_be_positive_integers():
  assert eval_lib.parse_counts("4032, 16128") == (4032, 16128)
  for bad in ("", "0", "-5", "4k", "12,", "1.5", None):
    with pytest.raises(eval_lib.EvalError, match="--lengths=.*: must be comma-separated positive"):
      eval_lib.parse_counts(bad)


@pytest.mark.parametrize("task", tasks_lib.TASKS)
def test_copying_model_scores_all_and_a_guessing_one_nothing(monkeypatch, tmp_path, task):
  # Chunks of 15 where the answer fits (14 tokens), else of 31.
  builder = tasks_lib.TaskBuilder(TOKENIZER, 15 if task in ("passkey", "multikey", "multihop")
                                  else 31)
  settings = eval_lib.Settings(task=task, lengths=(600, 900), out=str(tmp_path / "r.json"),
                               samples=(9, 7), depths=3, batch=4)
  stream = _haystack(0, 5000)
  rng = np.random.default_rng(0)

  def retrieving(prompts, everything):
    """A session whose every landmark and prompt end retrieved all earlier chunks, or nothing."""
    chunks = len(prompts[0]) // builder.chunk_len
    rows = np.where(everything, np.arange(chunks)[None, :], -1)
    rows = np.where(rows < np.arange(chunks)[:, None], rows, -1)  # [landmark, chunks before it]
    end = np.where(everything, np.arange(chunks), -1)
    return types.SimpleNamespace(retrieved=lambda group: [rows] * len(prompts),
                                 prompt_end_retrieved=lambda group: [end] * len(prompts))

  def copying(decoder, prompts, max_new, **_):
    answers = np.stack([copy_the_needle(task, p)[:max_new] for p in prompts])
    return answers, retrieving(prompts, True)

  def guessing(decoder, prompts, max_new, **_):
    answers = rng.choice(TOKENIZER.encode("0123456789"), (len(prompts), max_new))
    return answers, retrieving(prompts, False)

  decoder = types.SimpleNamespace(config=types.SimpleNamespace(chunk_len=builder.chunk_len),
                                  retrieval_groups=2)
  for model, expected in ((copying, 1.0), (guessing, 0.0)):
    monkeypatch.setattr(generate_lib, "continue_prompts", model)
    rows = eval_lib.evaluate_retrieval(decoder, builder, settings, stream, progress=False)
    assert [(r["length"], r["samples"]) for r in rows] == [(600, 9), (900, 9)]  # 7: 3 per depth
    for row in rows:
      assert list(row["by_depth"]) == ["0", "0.5", "1"] == list(row["retrieved_by_depth"])
      assert row["accuracy"] == expected and set(row["by_depth"].values()) == {expected}
      assert row["needle_retrieved"] == expected and row["missed_though_retrieved"] == 0


def test_needle_retrieved_needs_every_chunk_of_the_values():
  c = 15
  builder = tasks_lib.TaskBuilder(TOKENIZER, c)
  sample = builder.make("passkey", _haystack(0, 600), np.random.default_rng(0), 0.5)
  sample = dataclasses.replace(sample, evidence=np.arange(5) + 7 * c - 2)  # chunks 6 and 7
  serving = sample.answer_start // c - 1
  empty = np.full((serving + 1, 3), -1)

  def rows(*held):
    out = empty.copy()
    out[serving, :len(held)] = held
    return out

  assert eval_lib.needle_retrieved(sample, [rows(6, 7)], c)
  assert eval_lib.needle_retrieved(sample, [rows(2, 7, 6)], c)
  assert eval_lib.needle_retrieved(sample, [rows(7), rows(6)], c)  # either group's slots count
  assert not eval_lib.needle_retrieved(sample, [rows(7)], c)  # half the value is missing
  other = empty.copy()
  other[serving - 1, :2] = (6, 7)  # an earlier landmark's retrieval serves another chunk
  assert not eval_lib.needle_retrieved(sample, [other], c)
  # Values in the serving landmark's own chunk are in the window, not retrievable there.
  in_window = dataclasses.replace(sample, evidence=np.arange(5) + serving * c)
  assert eval_lib.needle_retrieved(in_window, [empty], c)


@pytest.mark.parametrize("stride", [0, 14])
def test_perplexity_equals_the_one_shot_loss(checkpoint, tmp_path, stride):
  config, folder, params = checkpoint
  length, windows = 42, 3
  settings = eval_lib.Settings(task="ppl", lengths=(length,), out=str(tmp_path / "ppl.json"),
                               windows=windows, stride=stride, batch=2)
  result = eval_lib.run(config, folder, settings, progress=False)["results"][0]
  assert os.path.exists(tmp_path / "ppl_perplexity.png")
  stream = sources.load_corpus(config.data, tokenizer_lib.make_tokenizer("byte")).eval.array()
  starts = np.arange(windows) * (stride or length)
  tokens = jnp.asarray(np.stack([stream[s:s + length] for s in starts]), jnp.int32)
  mask = np.ones((windows, length), np.int32)
  if stride:
    mask[1:, :length - stride] = 0
  model = lm.make_model(config_lib.validate(config))
  total, count = lm.loss_terms(model, jax.device_get(params), tokens, train=False,
                               rng=jax.random.key(0), target_weights=jnp.asarray(mask))
  assert result["tokens"] == int(count) == (length - 1) + (windows - 1) * (stride or length - 1)
  np.testing.assert_allclose(result["nll"], float(total / count), rtol=1e-5)
  np.testing.assert_allclose(result["perplexity"], np.exp(result["nll"]), rtol=1e-6)


def test_equal_token_perplexity_scores_the_same_tokens_at_every_length(checkpoint, tmp_path):
  config, folder, params = checkpoint
  lengths, scored, windows = (14, 28, 42), 5, 3
  settings = eval_lib.Settings(task="ppl", lengths=lengths, out=str(tmp_path / "ppl.json"),
                               windows=windows, scored=scored, batch=2)
  rows = eval_lib.run(config, folder, settings, progress=False)["results"]
  assert [r["tokens"] for r in rows] == [windows * scored] * 3
  stream = sources.load_corpus(config.data, tokenizer_lib.make_tokenizer("byte")).eval.array()
  model = lm.make_model(config_lib.validate(config))
  ends = max(lengths) + scored * np.arange(windows)  # the same scored stream tokens for all
  for length, row in zip(lengths, rows):
    tokens = jnp.asarray(np.stack([stream[e - length:e] for e in ends]), jnp.int32)
    mask = np.zeros((windows, length), np.int32)
    mask[:, -scored:] = 1
    total, count = lm.loss_terms(model, jax.device_get(params), tokens, train=False,
                                 rng=jax.random.key(0), target_weights=jnp.asarray(mask))
    assert int(count) == windows * scored
    np.testing.assert_allclose(row["nll"], float(total / count), rtol=1e-5)
  assert len({round(r["nll"], 6) for r in rows}) == 3  # the context changes the numbers
  for overrides, message in ((dict(scored=14), "--scored=14: must be shorter than every length"),
                             (dict(scored=3, stride=3), "give one of them"),
                             (dict(scored=-1), "--scored=-1: must be >= 0")):
    with pytest.raises(eval_lib.EvalError, match=message):
      eval_lib.run(config, folder, dataclasses.replace(settings, **overrides), progress=False)


def test_bad_input_gives_one_error_and_no_file(checkpoint, tmp_path):
  config, folder, _ = checkpoint
  out = str(tmp_path / "r.json")
  cases = [
      (dict(lengths=(200,), max_len=120), eval_lib.EvalError,
       "--lengths: 200 is longer than --max_len=120"),
      (dict(lengths=(60,)), DataError, "samples of 60 tokens are too short for task 'passkey'"),
      (dict(lengths=(80,), out=str(tmp_path / "missing" / "r.json")), eval_lib.EvalError,
       "its folder does not exist"),
      (dict(lengths=(80,), samples=(0,)), eval_lib.EvalError, "--samples=0"),
      (dict(lengths=(80, 90), samples=(4, 4, 4)), eval_lib.EvalError, "one per length (2)"),
  ]
  for overrides, error, message in cases:
    settings = eval_lib.Settings(**{"task": "passkey", "out": out, **overrides})
    with pytest.raises(error) as raised:
      eval_lib.run(config, folder, settings, progress=False)
    assert message in str(raised.value)
  with pytest.raises(generate_lib.CheckpointError, match="from another model config"):
    eval_lib.run(small_config(mlp_dim=32), folder,
                 eval_lib.Settings(task="passkey", out=out, lengths=(80,)), progress=False)
  assert os.listdir(tmp_path) == []


def test_cli_passkey_run_writes_json_and_plots(checkpoint, tmp_path):
  _, folder, _ = checkpoint
  (tmp_path / "config.py").write_text(
      "from tests.helpers import small_config\n"
      "def get_config(): return small_config()\n")
  out = tmp_path / "out"
  out.mkdir()
  command = [sys.executable, "-m", "drt_jax.eval", "--config", str(tmp_path / "config.py"),
             "--checkpoint", folder, "--task", "passkey", "--out", str(out / "p.json"),
             "--samples", "4", "--depths", "2", "--batch", "4", "--segment_len", "112",
             "--chunk_memory", "host"]
  result = subprocess.run(command + ["--lengths", "80,x"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --lengths='80,x': must be comma-separated positive integers, e.g. 4032,16128")
  result = subprocess.run(command + ["--lengths", ",".join(map(str, PASSKEY_LENGTHS))], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(out)) == ["p.json", "p_accuracy.png", "p_heatmap.png"]
  results = json.loads((out / "p.json").read_text())
  assert results["task"] == "passkey" and results["chunk_len"] == 7
  for row, length in zip(results["results"], PASSKEY_LENGTHS):
    assert row["length"] == length and row["samples"] == 4 and 0 <= row["accuracy"] <= 1
    assert list(row["by_depth"]) == ["0", "1"] and 0 <= row["needle_retrieved"] <= 1
    assert (f"passkey length {length:>9}: {row['accuracy']:.4f} (needle retrieved "
            f"{row['needle_retrieved']:.4f})") in result.stdout


@pytest.mark.parametrize("overrides", [{"retrieval": "random"}, {"arch": "swa"},
                                       {"arch": "full", "use_alibi": False}],
                         ids=["drt_random", "swa", "full"])
def test_every_architecture_evaluates_ppl_and_passkey(tmp_path, overrides):
  """Through the architecture's decoder: ppl equals the one-shot loss, passkey runs end to end
  (needle_retrieved null where nothing is retrieved)."""
  config = small_config(**overrides)
  params = save_initial_checkpoint(config, str(tmp_path / "run"))
  length, windows = 42, 2
  settings = eval_lib.Settings(task="ppl", lengths=(length,), out=str(tmp_path / "ppl.json"),
                               windows=windows, batch=2)
  result = eval_lib.run(config, str(tmp_path / "run"), settings, progress=False)["results"][0]
  stream = sources.load_corpus(config.data, tokenizer_lib.make_tokenizer("byte")).eval.array()
  tokens = jnp.asarray(np.stack([stream[s:s + length] for s in range(0, windows * length,
                                                                      length)]), jnp.int32)
  model = lm.make_model(config_lib.validate(config))
  total, count = lm.loss_terms(model, jax.device_get(params), tokens, train=False,
                               rng=jax.random.key(0))
  np.testing.assert_allclose(result["nll"], float(total / count), rtol=1e-5)
  settings = eval_lib.Settings(task="passkey", lengths=PASSKEY_LENGTHS[:1], samples=(2,), depths=2,
                               batch=2, out=str(tmp_path / "passkey.json"))
  row = eval_lib.run(config, str(tmp_path / "run"), settings, progress=False)["results"][0]
  assert row["samples"] == 2 and 0 <= row["accuracy"] <= 1
  retrieves = config.model.arch == "drt"
  assert (row["needle_retrieved"] is not None) == retrieves
  saved = json.loads((tmp_path / "passkey.json").read_text())
  assert saved["arch"] == config.model.arch and saved["results"][0]["needle_retrieved"] == (
      row["needle_retrieved"])
