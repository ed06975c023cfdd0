"""Prompt-end retrieval (inference.py, docs/design.md "Prompt-end retrieval"): a prompt that ends
inside a chunk is answered with a retrieval made after its last token; eval's --question_offset."""

import dataclasses
import os
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax import eval as eval_lib
from drt_jax import generate as generate_lib
from drt_jax import inference
from drt_jax.data import DataError
from drt_jax.data import tasks as tasks_lib
from drt_jax.model import lm
from drt_jax.model import retrieval
from drt_jax.model.head import tied_logits
from tests.helpers import model_config, random_tokens, small_config
from tests.test_tasks import QUESTIONS, TOKENIZER, _haystack, copy_the_needle

C = 7  # chunk_len of small_config
MAX_LEN = 8 * C


@pytest.fixture(scope="module")
def setup():
  """test_generate's decoding model (2 groups, top-2, init_std 0.1, so a different retrieval
  moves the logits by ~1) and its decoder: segments of two chunks, all in float32."""
  config = small_config(topk=2, init_std=0.1)
  config.data.seq_len = MAX_LEN
  mc = model_config(config)
  model = lm.make_model(mc)
  params = nn.meta.unbox(lm.init_params(model, jax.random.key(0), 1, MAX_LEN))
  decoder = inference.DRTDecoder(mc, params, max_len=MAX_LEN, segment_len=2 * C)
  return model, params, decoder, np.asarray(random_tokens(1, 2, MAX_LEN))


def _prefilled(decoder, prompt, end_prompt, memory="device"):
  session = decoder.start(prompt.shape[0], memory)
  return session, session.prefill(prompt, end_prompt=end_prompt)


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _active(session, group):
  return jax.tree.map(lambda x: np.asarray(x[:, group]), session.state.active)


@pytest.mark.parametrize("length", [4 * C, 3 * C + 4])
def test_off_decoding_is_the_one_shot_forward(setup, length):
  """Without prompt-end retrieval, prompts ending at offsets 0 and 4 of a chunk are continued
  exactly as the one-shot forward's greedy argmax, through the next chunk boundary
  (tests/test_generate.py has ragged batches); with it, the tokens change."""
  model, params, decoder, tokens = setup
  prompts, new = tokens[:, :length], 9
  generated = generate_lib.generate(decoder, prompts, new, prompt_end_retrieval=False)
  sequences = np.pad(np.concatenate([prompts, generated], axis=1),
                     ((0, 0), (0, MAX_LEN - length - new)))
  hidden = model.apply({"params": params}, jnp.asarray(sequences))
  greedy = np.asarray(tied_logits(hidden, params["embed"]["embedding"], jnp.float32)).argmax(-1)
  np.testing.assert_array_equal(generated, greedy[:, length - 1:length + new - 1])
  with_it = generate_lib.generate(decoder, prompts, new)
  assert not np.array_equal(with_it, generated), "the option must change something here"


def test_the_provisional_landmark_is_scored_like_a_real_one(setup):
  """Group 0's prompt-end retrieval for a prompt 3 chunks + 4 tokens long equals the one built
  from the model's stage methods in the training forward: a landmark row right after the last
  prompt token, its lower-layer state normed by the group's query norm, scored against the
  landmark keys of the 3 complete chunks (the partial chunk is not a candidate)."""
  model, params, decoder, tokens = setup
  prompt = tokens[:, :3 * C + 4]
  session, _ = _prefilled(decoder, prompt, True)

  def reference(m):
    rows = jnp.concatenate([m.chunk_rows(prompt[:, :3 * C]), m.embed(prompt[:, 3 * C:]),
                            m.landmark_row(2)], axis=1)
    x = m.lower_layers(rows)
    keys, _, _ = m.encode(m.by_chunk(x[:, :3 * (C + 1)]))
    scores = retrieval.chunk_scores(m.retrieval_queries(0, x[:, -1:]), keys)
    mask = retrieval.causal_chunk_mask(jnp.array([3]), jnp.arange(3))
    return retrieval.select_chunks(scores, mask, decoder.topk)

  expected = model.apply({"params": params}, method=reference)
  got = _active(session, 0)
  np.testing.assert_array_equal(got.indices, np.asarray(expected.indices)[:, 0])
  np.testing.assert_array_equal(got.valid, np.asarray(expected.valid)[:, 0])
  np.testing.assert_allclose(got.weights, np.asarray(expected.weights)[:, 0], atol=1e-5)
  served = session.prompt_end_retrieved(0)
  for i in range(2):
    np.testing.assert_array_equal(served[i], np.where(got.valid[i], got.indices[i], -1))
  host, _ = _prefilled(decoder, prompt, True, "host")  # chunk memory in host memory: the same
  assert _leaves_equal(jax.tree.map(np.asarray, host.state.active), session.state.active)
  # The retrieval made at chunk 2's landmark (what served before) is another one.
  assert not np.allclose(got.weights, _active(_prefilled(decoder, prompt, False)[0], 0).weights)


def test_the_provisional_retrieval_reads_the_last_prompt_token(setup):
  """Changing only the prompt's last token changes every group's prompt-end retrieval (its
  weights); without prompt-end retrieval nothing that serves the answer changes."""
  _, _, decoder, tokens = setup
  prompt = tokens[:, :3 * C + 4]
  other = prompt.copy()
  other[:, -1] = (other[:, -1] + 101) % 257
  for end_prompt in (True, False):
    a, b = (_prefilled(decoder, p, end_prompt)[0] for p in (prompt, other))
    for g in range(decoder.config.num_groups):
      wa, wb = _active(a, g).weights, _active(b, g).weights
      assert end_prompt != np.array_equal(wa, wb), (end_prompt, g)
      if end_prompt:
        assert np.abs(wa - wb).max() > 1e-3, g


@pytest.mark.parametrize("offset", range(C))
def test_caches_afterwards_are_those_of_the_prompt_alone(setup, offset):
  """After prefill with prompt-end retrieval, the attention caches, positions, current chunk
  rows, chunk store and landmark retrievals are exactly those of feeding the prompt without it:
  only the retrieval serving the rest of the chunk differs. A prompt ending at a chunk boundary
  (offset 0) has its last token fed as a step, so it equals that way of feeding it exactly and
  the plain prefill to float32 rounding. At the next boundary, group 0 retrieves as without it
  (its query is the lower layers')."""
  _, _, decoder, tokens = setup
  length = 3 * C + offset + (C if offset == 0 else 0)
  prompt = tokens[:, :length]
  on, _ = _prefilled(decoder, prompt, True)
  off, _ = _prefilled(decoder, prompt, False)
  if offset == 0:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
                 (on.state.cache, on.store.buffer, on.store.keys),
                 (off.state.cache, off.store.buffer, off.store.keys))
    off = decoder.start(2)
    off.prefill(prompt[:, :-1])
    off.step(prompt[:, -1])
  assert _leaves_equal((on.state.cache, on.state.position, on.state.chunk_rows),
                       (off.state.cache, off.state.position, off.state.chunk_rows))
  assert _leaves_equal((on.store.buffer, on.store.keys), (off.store.buffer, off.store.keys))
  assert list(on.lengths) == list(off.lengths) == [length] * 2
  for g in range(decoder.config.num_groups):
    assert _leaves_equal(on.retrieved(g), off.retrieved(g))
  if offset:
    assert not _leaves_equal(on.state.active, off.state.active)
    for t in range(length, -(-length // C) * C):  # the generated tokens, to the next boundary
      on.step(tokens[:, t])
      off.step(tokens[:, t])
    np.testing.assert_array_equal(on.retrieved(0)[0], off.retrieved(0)[0])


def test_the_rest_of_the_chunk_is_served_by_it(setup):
  """The hidden state prefill returns (it predicts the first generated token) is the last prompt
  token's under the prompt-end retrieval: equal to a step of that token from the state before it
  with that retrieval serving; and the next tokens of the chunk are served by it too."""
  _, _, decoder, tokens = setup
  prompt = tokens[:, :3 * C + 4]
  on, hidden = _prefilled(decoder, prompt, True)
  replay = decoder.start(2)
  replay.prefill(prompt[:, :-1])
  # Copies: the step consumes the state it is given.
  serving = jax.tree.map(lambda x: x.copy(), (on.state.active, on.state.active_kv))
  replay.state = replay.state.replace(active=serving[0], active_kv=serving[1])
  np.testing.assert_allclose(hidden, replay.step(prompt[:, -1]), atol=1e-5)
  _, plain = _prefilled(decoder, prompt, False)
  assert np.abs(np.asarray(hidden) - np.asarray(plain)).max() > 1e-3
  kept = jax.tree.map(np.asarray, on.state.active)
  on.step(tokens[:, len(prompt[0])])
  assert _leaves_equal(kept, on.state.active)  # not replaced before the chunk's own landmark


def test_other_architectures_ignore_it():
  """swa has no per-chunk retrieval: prefill returns the same with or without end_prompt."""
  config = small_config(arch="swa")
  mc = model_config(config)
  params = nn.meta.unbox(lm.init_params(lm.make_model(mc), jax.random.key(0), 1, 2 * C))
  decoder = inference.CachedDecoder(mc, params, max_len=4 * C, segment_len=2 * C)
  prompt = np.asarray(random_tokens(2, 1, 3))  # token steps alone: one small compilation
  np.testing.assert_array_equal(decoder.start(1).prefill(prompt, end_prompt=True),
                                decoder.start(1).prefill(prompt))
  with pytest.raises(inference.InputError, match="retrieves no chunks"):
    decoder.start(1).prompt_end_retrieved(0)


@pytest.mark.parametrize("task", ["passkey", "multikey", "multihop"])
def test_questions_end_at_every_offset(task):
  """make(..., question_offset=o): the prompt ends o tokens after a chunk boundary with the
  question, the answer follows; offset 1 is the default layout; the values do not depend on it."""
  c, length = 15, 500
  builder = tasks_lib.TaskBuilder(TOKENIZER, c)
  samples = [builder.make(task, _haystack(0, length), np.random.default_rng(3), 0.5, o)
             for o in range(c)]
  for o, sample in enumerate(samples):
    start, answer = sample.answer_start, sample.answer
    assert start % c == o and length - c - len(answer) < start <= length - len(answer)
    assert re.search(QUESTIONS[task] + "$", TOKENIZER.decode(sample.prompt))
    np.testing.assert_array_equal(sample.tokens[start:start + len(answer)], answer)
    np.testing.assert_array_equal(answer, samples[0].answer)
    np.testing.assert_array_equal(copy_the_needle(task, sample.prompt)[:len(answer)], answer)
  default = builder.make(task, _haystack(0, length), np.random.default_rng(3), 0.5)
  np.testing.assert_array_equal(default.tokens, samples[1].tokens)
  for bad in (c, -1, 1.5):
    with pytest.raises(DataError, match=rf"question_offset={bad!r}: must be an integer in 0 .. "
                       rf"{c - 1} \(model.chunk_len={c}\)"):
      builder.make(task, _haystack(0, length), np.random.default_rng(3), 0.5, bad)


@pytest.mark.parametrize("task", ["passkey", "multikey", "multihop"])
def test_a_copying_model_answers_at_every_offset(monkeypatch, tmp_path, task):
  """The eval harness with --question_offset all: a model that copies the needle scores 1 at
  every offset 0 .. chunk_len - 1 (a guessing one 0), reported by offset and plotted."""
  c = 15
  builder = tasks_lib.TaskBuilder(TOKENIZER, c)
  settings = eval_lib.Settings(task=task, lengths=(600,), out=str(tmp_path / "r.json"),
                               samples=(2 * c,), depths=3, batch=8, question_offset="all")
  rng = np.random.default_rng(0)
  prompts_seen = []

  def session(prompts, everything):
    """Every prompt end retrieved all complete chunks, or nothing."""
    ends = [np.arange(len(p) // c) if everything else np.full(2, -1) for p in prompts]
    return types.SimpleNamespace(retrieved=lambda group: [np.zeros((0, 2), int)] * len(prompts),
                                 prompt_end_retrieved=lambda group: ends)

  def copying(decoder, prompts, max_new, **options):
    assert options["prompt_end_retrieval"] is True
    prompts_seen.extend(len(p) % c for p in prompts)
    return np.stack([copy_the_needle(task, p)[:max_new] for p in prompts]), session(prompts, True)

  def guessing(decoder, prompts, max_new, **_):
    answers = rng.choice(TOKENIZER.encode("0123456789"), (len(prompts), max_new))
    return answers, session(prompts, False)

  decoder = types.SimpleNamespace(config=types.SimpleNamespace(chunk_len=c), retrieval_groups=1)
  for model, expected in ((copying, 1.0), (guessing, 0.0)):
    monkeypatch.setattr(generate_lib, "continue_prompts", model)
    row, = eval_lib.evaluate_retrieval(decoder, builder, settings, _haystack(1, 5000),
                                       progress=False)
    assert list(row["by_offset"]) == [str(o) for o in range(c)]
    assert set(row["by_offset"].values()) == {expected} and row["accuracy"] == expected
    assert set(row["offset_samples"].values()) == {2}
    if expected:  # needles in the window count as held even for a model retrieving nothing
      assert set(row["retrieved_by_offset"].values()) == {expected}
  assert sorted(prompts_seen) == sorted(list(range(c)) * 2)
  results = {"task": task, "train_len": 300, "chunk_len": c, "results": [row],
             "settings": dataclasses.asdict(settings)}
  eval_lib.write(results, settings.out)
  assert sorted(os.listdir(tmp_path)) == ["r.json", "r_accuracy.png", "r_heatmap.png",
                                          "r_offset.png"]


def test_question_offset_settings():
  """--question_offset: an integer in range, random (reproducible from the seed) or all; other
  values are one line naming the flag and what is allowed."""
  assert eval_lib.parse_question_offset("5") == 5
  assert eval_lib.parse_question_offset("random") == "random"
  config = small_config()
  for bad in (7, -1, eval_lib.parse_question_offset("x")):
    settings = eval_lib.Settings(task="passkey", lengths=(80,), out="r.json", question_offset=bad)
    with pytest.raises(eval_lib.EvalError, match=rf"--question_offset={bad!r}: must be an "
                       r"integer in 0 .. 6 \(model.chunk_len=7\), 'random' or 'all'"):
      eval_lib.check(settings, config, 1000, None)
  random = eval_lib.Settings(task="passkey", lengths=(80,), out="r.json", question_offset="random")
  drawn = eval_lib.question_offsets(random, 80, 200, C)
  np.testing.assert_array_equal(drawn, eval_lib.question_offsets(random, 80, 200, C))
  assert set(drawn) == set(range(C))
  other = eval_lib.question_offsets(dataclasses.replace(random, seed=1), 80, 200, C)
  assert not np.array_equal(drawn, other)


def test_needle_retrieved_reads_the_retrieval_that_served_the_prompt_end():
  """With a prompt-end retrieval, needle_retrieved asks whether it held the needle's chunks (the
  landmarks' rows do not count); without one, the landmark before the prompt's last chunk."""
  c = 15
  builder = tasks_lib.TaskBuilder(TOKENIZER, c)
  sample = builder.make("passkey", _haystack(0, 600), np.random.default_rng(0), 0.5, 9)
  sample = dataclasses.replace(sample, evidence=np.arange(5) + 7 * c - 2)  # chunks 6 and 7
  last = (sample.answer_start - 1) // c
  assert sample.answer_start % c == 9 and last == sample.answer_start // c
  rows = np.full((last, 2), -1)
  rows[last - 1] = (6, 7)
  assert eval_lib.needle_retrieved(sample, [rows], c)
  assert not eval_lib.needle_retrieved(sample, [rows], c, prompt_end=[np.array([6, -1])])
  assert eval_lib.needle_retrieved(sample, [np.full((last, 2), -1)], c,
                                   prompt_end=[np.array([7, 6])])
