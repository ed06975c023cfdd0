"""Synthetic retrieval tasks (data/tasks.py): alignment to the chunk size, exact-match scoring, the
training mixture in the grain pipeline."""

import re

import numpy as np
import pytest

from configs import tiny
from drt_jax.data import DataError
from drt_jax.data import pipeline
from drt_jax.data import tasks as tasks_lib
from drt_jax.data import tokenizer as tokenizer_lib

TOKENIZER = tokenizer_lib.ByteTokenizer()
QUESTIONS = {"passkey": r"\|What is the passkey\? The passkey is ",
             "multikey": r"\|The value of \d{5} is ",
             "multihop": r"\|The path from \d{5} is ",
             "multiquery": r"\|The values of \d{5}, \d{5}, \d{5}, \d{5} are ",
             "vartrack": r"\|Which variables equal \d{5}\? They are: "}


def _haystack(seed, length):
  """Random lowercase letters and spaces: no digit, no '|', so only needles hold those."""
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", np.uint8)
  return np.random.default_rng(seed).choice(letters, length).astype(np.int32)


def _find(tokens, pattern):
  """Start of the first occurrence of pattern in tokens, or -1."""
  n = len(pattern)
  windows = np.lib.stride_tricks.sliding_window_view(tokens, n)
  hits = np.flatnonzero((windows == pattern).all(axis=1))
  return int(hits[0]) if len(hits) else -1


def _after(tokens, *parts, digits=5):
  """The `digits` tokens that follow the concatenated text parts in tokens (None if absent)."""
  pattern = np.concatenate([TOKENIZER.encode(p) if isinstance(p, str) else p for p in parts])
  at = _find(tokens, pattern)
  return None if at < 0 else tokens[at + len(pattern):at + len(pattern) + digits]


def copy_the_needle(task, prompt):
  """A 'model' that reads the question's key from the prompt's end and copies the value of the
  needle that answers it (following both hops for multihop)."""
  if task == "passkey":
    return _after(prompt, "|The passkey is ")
  if task == "multikey":
    key = _after(prompt, "|The value of ")
    return _after(prompt, "|One of the special magic numbers for ", key, " is ")
  if task == "multiquery":
    text = TOKENIZER.decode(prompt)
    keys = re.findall(r"\d{5}", text[text.rindex("|"):])  # the question's, in its order
    values = [_after(prompt, "|One of the special magic numbers for ", k, " is ") for k in keys]
    return TOKENIZER.encode(", ".join(TOKENIZER.decode(v) for v in values))
  if task == "vartrack":  # follow "VAR B = VAR A" from the name that holds the value asked
    text = TOKENIZER.decode(prompt)
    value = re.findall(r"\|Which variables equal (\d{5})", text)[-1]
    names = re.findall(r"\|VAR ([A-Z]{5}) = " + value + r"\|", text)
    while next_ := re.findall(r"\|VAR ([A-Z]{5}) = VAR " + names[-1] + r"\|", text):
      names.append(next_[0])
    return TOKENIZER.encode(" ".join(names))
  start = _after(prompt, "|The path from ")
  first = _after(prompt, "|DEF ", start, " -> ")
  second = _after(prompt, "|DEF ", first, " -> ")
  return np.concatenate([first, TOKENIZER.encode(", "), second])


def _samples(task, chunk_len, length, count, seed=0):
  builder = tasks_lib.TaskBuilder(TOKENIZER, chunk_len)
  rng = np.random.default_rng(seed)
  depths = np.linspace(0, 1, count)
  return builder, [builder.make(task, _haystack(i, length), rng, d) for i, d in enumerate(depths)]


# Chunks of 15 hold answers of up to 14 tokens: not multiquery's 26 nor vartrack's 29.
@pytest.mark.parametrize("task,chunk_len,length", [
    (task, chunk_len, length) for task in tasks_lib.TASKS
    for chunk_len, length in [(15, 500), (31, 777), (63, 1000), (64, 1000)]
    if chunk_len >= 31 or task in ("passkey", "multikey", "multihop")])
def test_the_answer_sits_where_the_scorer_looks(task, chunk_len, length):
  builder, samples = _samples(task, chunk_len, length, 6)
  for sample in samples:
    a, start = len(sample.answer), sample.answer_start
    assert len(sample.tokens) == length and a == builder.answer_len(task)
    # The question's last token opens the answer chunk; the whole answer fills that chunk.
    assert start % chunk_len == 1 and (start + a - 1) // chunk_len == start // chunk_len
    assert length - chunk_len - a < start <= length - a
    np.testing.assert_array_equal(sample.tokens[start:start + a], sample.answer)
    np.testing.assert_array_equal(sample.prompt, sample.tokens[:start])
    prompt = TOKENIZER.decode(sample.prompt)  # byte tokens: one character each
    assert re.search(QUESTIONS[task] + "$", prompt), prompt[-60:]
    # The answering needle sits at its depth of the haystack before the question.
    room = prompt.rindex("|")
    assert abs(sample.needle_start - sample.depth * room) <= 60
    assert TOKENIZER.decode(sample.tokens[sample.needle_start:sample.needle_start + 4]) in (
        "|The", "|One", "|DEF", "|VAR")
    # The evidence is the needle tokens holding the answer's values (multihop: two needles),
    # in the answer's order: the answer without its separators.
    values = ~np.isin(sample.answer, TOKENIZER.encode(", "))
    np.testing.assert_array_equal(sample.tokens[sample.evidence], sample.answer[values])
    assert 0 <= sample.evidence.min() and sample.evidence.max() < room


@pytest.mark.parametrize("task", tasks_lib.TASKS)
def test_copying_scores_everything_and_guessing_nothing(task):
  _, samples = _samples(task, 31, 600, 40, seed=1)
  copied = [tasks_lib.exact_match(s, copy_the_needle(task, s.prompt)) for s in samples]
  assert np.mean(copied) == 1.0
  rng = np.random.default_rng(2)
  digits = TOKENIZER.encode("0123456789")
  guessed = [tasks_lib.exact_match(s, rng.choice(digits, len(s.answer))) for s in samples]
  assert np.mean(guessed) == 0.0
  # Every answer token counts: a copy with only its last token wrong scores nothing.
  last_wrong = [tasks_lib.exact_match(s, np.concatenate([s.answer[:-1], [s.answer[-1] + 1]]))
                for s in samples]
  assert np.mean(last_wrong) == 0.0


def test_samples_are_reproducible_and_vary():
  _, a = _samples("multikey", 15, 600, 5, seed=3)
  _, b = _samples("multikey", 15, 600, 5, seed=3)
  _, c = _samples("multikey", 15, 600, 5, seed=4)
  assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b))
  assert not any(np.array_equal(x.answer, y.answer) for x, y in zip(a, c))


def test_bad_task_settings_are_named():
  with pytest.raises(DataError, match="'multihop': its answer of 12 tokens .*chunk_len=7"):
    tasks_lib.TaskBuilder(TOKENIZER, 7).check("multihop", 1000)
  builder = tasks_lib.TaskBuilder(TOKENIZER, 15)
  with pytest.raises(DataError, match="samples of 60 tokens are too short for task 'passkey' "
                     ".needs >= 79"):
    builder.make("passkey", _haystack(0, 60), np.random.default_rng(0), 0.5)
  with pytest.raises(DataError, match="task 'needle'"):
    builder.check("needle", 1000)


def _config(cache_dir, **data):
  config = tiny.get_config()  # chunk_len 15, byte tokenizer, pydoc
  config.data.seq_len = 15 * 32  # room for multikey's six needles
  config.data.cache_dir = str(cache_dir)
  config.data.update(data)
  return config


def test_training_mixture(tmp_path):
  config = _config(tmp_path, task_fraction=0.5, tasks="passkey,multikey", task_answer_weight=7.0)
  mixed = pipeline.make_train_iterator(config)
  plain = pipeline.make_train_iterator(_config(tmp_path))
  questions = {"passkey": TOKENIZER.encode("|What is the passkey? The passkey is "),
               "multikey": TOKENIZER.encode("|The value of ")}
  # Where the answer starts, after the question (multikey: question, key, " is ").
  question_len = {"passkey": len(questions["passkey"]), "multikey": len(questions["multikey"]) + 9}
  builder = tasks_lib.TaskBuilder(TOKENIZER, 15)
  kinds = []
  for _ in range(4):
    batch = next(mixed)
    for row, weights, window in zip(batch["inputs"], batch["target_weights"],
                                    next(plain)["inputs"]):
      found = {t: _find(row, q) for t, q in questions.items() if _find(row, q) >= 0}
      if not found:
        np.testing.assert_array_equal(row, window)
        np.testing.assert_array_equal(weights, 1.0)
        kinds.append("plain")
        continue
      (task, at), = found.items()
      kinds.append(task)
      start = at + question_len[task]
      assert start % 15 == 1, "answer at index 1 of a chunk of model.chunk_len=15"
      np.testing.assert_array_equal(row[start:start + 5], copy_the_needle(task, row[:start]))
      expected = np.ones(len(row), np.float32)
      expected[start:start + 5] = 7.0  # the answer's tokens weigh data.task_answer_weight
      np.testing.assert_array_equal(weights, expected)
      overwritten = builder.min_length(task) - 15  # needles, question and answer
      assert (row != window).sum() <= overwritten, "built on its own window"
  counts = {k: kinds.count(k) for k in ("plain", "passkey", "multikey")}
  assert 20 <= counts["plain"] <= 44 and counts["passkey"] > 5 and counts["multikey"] > 5, counts
  first = next(pipeline.make_train_iterator(config))["inputs"]
  np.testing.assert_array_equal(first, next(pipeline.make_train_iterator(config))["inputs"])


@pytest.mark.parametrize("data,message", [
    ({"task_fraction": 1.5}, "data.task_fraction=1.5: must be in [0, 1]"),
    ({"task_fraction": 0.1, "tasks": "passkey,needle"}, "data.tasks='passkey,needle'"),
    ({"task_answer_weight": -1.0}, "data.task_answer_weight=-1.0: must be a number > 0"),
])
def test_bad_mixture_fields(tmp_path, data, message):
  with pytest.raises(DataError) as error:
    pipeline.validate_data_config(_config(tmp_path, **data).data)
  assert message in str(error.value)
