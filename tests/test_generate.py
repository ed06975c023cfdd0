"""Incremental decoding against the one-shot forward (docs/specification.md §4); sampling; generate."""

import os
import subprocess
import sys
import weakref

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from drt_jax import config as config_lib
from drt_jax import generate as generate_lib
from drt_jax import inference
from drt_jax import train_lib
from drt_jax.model import lm
from drt_jax.model import retrieval
from drt_jax.model.head import tied_logits
from tests.helpers import model_config, random_tokens, small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNKS = 8  # of chunk_len 7: 56 tokens
SEGMENT = 14  # two chunks


def decode_config():
  """small_config (2 groups, chunk_len 7, window 12) with top-2 retrieval and init_std 0.1, where
  retrieving a wrong chunk moves the logits by ~1 (at 0.02 only by ~1e-2)."""
  config = small_config(topk=2, init_std=0.1)
  config.data.seq_len = 7 * CHUNKS
  return config


@pytest.fixture(scope="module")
def setup():
  config = decode_config()
  mc = model_config(config)
  model = lm.make_model(mc)
  params = nn.meta.unbox(lm.init_params(model, jax.random.key(0), 1, config.data.seq_len))
  decoder = inference.DRTDecoder(mc, params, max_len=7 * CHUNKS, segment_len=SEGMENT)
  return model, params, decoder


def _one_shot(model, params, tokens):
  """Logits [b, T, vocab] and, per group, the retrieval sown at every chunk."""
  hidden, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
  logits = tied_logits(hidden, params["embed"]["embedding"], model.config.compute_dtype)
  sown = [state["intermediates"][f"retrieval_{g}"][0] for g in range(model.config.num_groups)]
  return np.asarray(logits), sown


# How the 56 tokens go in: lengths of successive feed() calls; the rest one step() at a time.
PLANS = {
    "steps": [],  # every token, landmark and chunk boundary one step at a time
    "segments": [56],  # four segments of two chunks: retrieval carried across segments
    "ragged": [10, 25, 9],  # 10 = 1 chunk + 3 steps; 25 = 4 steps to a boundary, 2 segments...
    "chunks": [7] * 8,  # one-chunk segments: each attends to a history shorter than the window
}
# Host/device transfer sizes: the defaults (all 8 chunks' keys in one block, a segment's retrieved
# chunks in one piece), and small ones (keys in blocks of 3 chunks, the last one partial; the
# retrieved chunks' K/V in pieces of 2).
BLOCKS = {"whole": {}, "small": {"key_block": 3, "gather_block": 2}}


@pytest.fixture(scope="module")
def runs(setup):
  _, params, decoder = setup
  tokens = np.asarray(random_tokens(1, 2, 7 * CHUNKS))
  results = {}
  for blocks, sizes in BLOCKS.items():
    blocked = inference.DRTDecoder(decoder.config, params, max_len=decoder.max_len,
                                segment_len=SEGMENT, **sizes)
    for plan, feeds in PLANS.items():
      for memory in inference.CHUNK_MEMORIES:
        session = blocked.start(2, memory)
        hidden, done = [], 0
        for size in feeds:
          hidden += [h for _, h in session.feed(tokens[:, done:done + size])]
          done += size
        hidden += [session.step(tokens[:, t])[:, None] for t in range(done, tokens.shape[1])]
        logits = np.asarray(decoder.logits(jnp.concatenate(hidden, axis=1)))
        results[plan, memory, blocks] = logits, session
  return tokens, results


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("memory", inference.CHUNK_MEMORIES)
@pytest.mark.parametrize("plan", list(PLANS))
def test_incremental_logits_equal_the_one_shot_forward(setup, runs, plan, memory, blocks):
  model, params, _ = setup
  tokens, results = runs
  expected, _ = _one_shot(model, params, tokens)
  np.testing.assert_allclose(results[plan, memory, blocks][0], expected, rtol=0, atol=1e-4)


def test_retrieval_picks_the_chunks_of_the_batch_forward(setup, runs):
  model, params, _ = setup
  tokens, results = runs
  _, sown = _one_shot(model, params, tokens)
  for run, (_, session) in results.items():
    for g, batch_retrieval in enumerate(sown):
      expected = np.where(batch_retrieval.valid, batch_retrieval.indices, -1)
      for row, got in enumerate(session.retrieved(g)):
        assert got.shape == expected[row].shape, run
        np.testing.assert_array_equal(got, expected[row], err_msg=f"{run} group {g}")
  assert (expected >= 0).sum() > 10, "the check must cover real retrievals"


def test_host_chunk_memory_gives_the_device_result(runs):
  _, results = runs
  for plan in PLANS:
    for blocks in BLOCKS:
      np.testing.assert_array_equal(results[plan, "host", blocks][0],
                                    results[plan, "device", blocks][0])


@pytest.mark.parametrize("block", [1, 2, 3, 5, 13])
def test_blocked_top_k_equals_select_chunks(block):
  """merge_top_k block by block (the last block partial for 2, 3 and 5) == select_chunks on all
  13 chunks: indices, validity and weights, bit for bit."""
  rng = np.random.default_rng(block)
  batch, queries, chunks, k = 3, 6, 13, 4
  scores = rng.standard_normal((batch, queries, chunks)).astype(np.float32)
  scores[1] = rng.integers(0, 3, (queries, chunks))  # ties, within and across blocks
  scores[2] = 1.5  # all tied
  visible = np.array([0, 1, 3, 4, 9, 13])  # none, fewer than k, k, more
  mask = np.broadcast_to(np.arange(chunks) < visible[:, None], scores.shape).copy()
  mask[2] &= rng.random((queries, chunks)) < 0.5  # scattered visible chunks
  expected = retrieval.select_chunks(jnp.asarray(scores), jnp.asarray(mask), k)
  best = None
  for first in range(0, chunks, block):
    best = retrieval.merge_top_k(best, scores[..., first:first + block],
                                 mask[..., first:first + block], first, k)
  got = retrieval.top_k_retrieval(best[0], best[1], best[0])
  assert not np.asarray(expected.valid)[:, 0].all() and np.asarray(expected.valid).any()
  for name, want, have in zip(retrieval.Retrieval._fields, expected, got):
    np.testing.assert_array_equal(np.asarray(have), np.asarray(want), err_msg=name)


def test_host_memory_keeps_no_context_sized_array_on_the_device(setup):
  """With host chunk memory, landmark keys and chunk K/V stay in host memory: no device array has
  a dimension of the capacity (1001 chunks here) or of the keys' whole blocks (2 x 1000), after
  segments, steps and a landmark."""
  _, params, decoder = setup
  capacity, sizes = 1001, {1001, 2000}
  big = inference.DRTDecoder(decoder.config, params, max_len=7 * capacity, segment_len=SEGMENT,
                          key_block=1000)
  tokens = np.asarray(random_tokens(5, 2, 35))
  session = big.start(2, "host")
  session.prefill(tokens[:, :30])  # two segments of two chunks, two steps
  for t in range(30, 35):  # through chunk 4's landmark
    session.step(tokens[:, t])
  assert not sizes & {n for leaf in jax.tree.leaves(session.state) for n in leaf.shape}
  assert not [a.shape for a in jax.live_arrays() if sizes & set(a.shape)]
  store = big.start(2, "device").store  # what the check would see
  assert (store.buffer.shape[1], store.keys.shape[1]) == (1001, 2000)


def test_feed_holds_no_earlier_piece_once_the_next_is_out(setup):
  """feed keeps no reference to a piece's hidden states [b, m, d] once the caller has dropped
  it: held, they added a segment's hidden states to a long prefill's peak device memory."""
  _, _, decoder = setup
  earlier = []
  for _, hidden in decoder.start(2, "host").feed(np.asarray(random_tokens(6, 2, 7 * CHUNKS - 3))):
    assert all(ref() is None for ref in earlier)
    earlier.append(weakref.ref(hidden))
    del hidden
  assert len(earlier) == 4 + 4  # segments of 2, 2, 2 and 1 chunks, then four token steps


def test_ragged_batch_generation_follows_the_forward(setup):
  """Prompts of different lengths, joined; host memory in key blocks of 2 chunks, so blocks that
  one sequence has filled are read while the other still writes to them. Without prompt-end
  retrieval (tests/test_prompt_end.py has it), generation is the one-shot forward's."""
  model, params, decoder = setup
  decoder = inference.DRTDecoder(decoder.config, params, max_len=decoder.max_len,
                                 segment_len=SEGMENT, key_block=2)
  prompts = [np.asarray(random_tokens(seed, 1, n))[0] for seed, n in ((3, 3), (4, 6))]
  new = 12  # both cross chunk boundaries at different steps
  generated = generate_lib.generate(decoder, prompts, new, chunk_memory="host",
                                    prompt_end_retrieval=False)
  for prompt, row in zip(prompts, generated):
    sequence = np.concatenate([prompt, row])
    padded = np.pad(sequence, (0, -len(sequence) % 7))[None]
    greedy = _one_shot(model, params, padded)[0][0].argmax(-1)
    np.testing.assert_array_equal(row, greedy[len(prompt) - 1:len(sequence) - 1])


def test_triton_inference_matches_the_forward():
  """impl="triton": segments run the Pallas-Triton attention and GCA kernels, token steps the decode
  kernel (sliding_window_decode) and GCA; interpret mode on CPU. f32 Triton dots on a GPU may use
  TF32, hence its looser tolerance."""
  config = small_config(chunk_len=63, window=100, topk=4, init_std=0.1)  # S = 64, a kernel tile
  config.data.seq_len = 63 * 12
  xla = lm.make_model(model_config(config))
  params = nn.meta.unbox(lm.init_params(xla, jax.random.key(0), 1, config.data.seq_len))
  tokens = np.asarray(random_tokens(6, 2, config.data.seq_len))
  config.model.impl = "triton"
  decoder = inference.DRTDecoder(model_config(config), params, max_len=63 * 12, segment_len=63 * 4)
  with jax.default_matmul_precision("highest"):
    expected, _ = _one_shot(xla, params, tokens)
    session = decoder.start(2, "host")
    hidden = [h for _, h in session.feed(tokens[:, :700])]  # 3 segments, 7 steps
    hidden += [session.step(tokens[:, t])[:, None] for t in range(700, tokens.shape[1])]
    logits = np.asarray(decoder.logits(jnp.concatenate(hidden, axis=1)))
  atol = 2e-2 if jax.default_backend() == "gpu" else 1e-4
  np.testing.assert_allclose(logits, expected, rtol=0, atol=atol)


def test_sampling_rules():
  logits = jax.random.normal(jax.random.key(0), (512, 50)) * 3
  rng = jax.random.key(1)
  greedy = generate_lib.sample(logits, rng, temperature=0.0, top_k=0)
  np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
  np.testing.assert_array_equal(generate_lib.sample(logits, rng, temperature=1.0, top_k=1), greedy)
  drawn = np.asarray(generate_lib.sample(logits, rng, temperature=1.0, top_k=3))
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  assert all(d in t for d, t in zip(drawn, top3))
  assert len(set(np.asarray(drawn - np.asarray(greedy)).tolist())) > 1, "top-3 must not be greedy"
  np.testing.assert_array_equal(drawn, generate_lib.sample(logits, rng, temperature=1.0, top_k=3))
  # Low temperature concentrates on the argmax, high temperature spreads out.
  cold = generate_lib.sample(logits, rng, temperature=0.05, top_k=0)
  hot = generate_lib.sample(logits, rng, temperature=100.0, top_k=0)
  assert np.mean(np.asarray(cold) == np.asarray(greedy)) > 0.95
  assert np.mean(np.asarray(hot) == np.asarray(greedy)) < 0.2


def test_bad_inputs_are_named(setup):
  _, _, decoder = setup
  with pytest.raises(inference.InputError, match="prompt 1 is empty"):
    generate_lib.generate(decoder, [[1, 2], []], 3)
  with pytest.raises(inference.InputError, match="prompt 0 has 50 tokens: .* max_len=56"):
    generate_lib.generate(decoder, [np.ones(50, np.int32)], 7)
  with pytest.raises(inference.InputError, match="max_new_tokens=0"):
    generate_lib.generate(decoder, [[1, 2]], 0)
  session = decoder.start(1)
  with pytest.raises(inference.InputError, match="57 tokens: longer than max_len=56"):
    session.feed(np.ones((1, 57), np.int32))
  with pytest.raises(inference.InputError, match="empty input"):
    session.feed(np.ones((1, 0), np.int32))
  mc = decoder.config
  with pytest.raises(config_lib.ConfigError, match="segment_len=10: must be a positive multiple "
                     "of model.chunk_len=7"):
    inference.DRTDecoder(mc, decoder.params, max_len=56, segment_len=10)
  with pytest.raises(config_lib.ConfigError, match="key_block=0: must be a positive integer"):
    inference.DRTDecoder(mc, decoder.params, max_len=56, segment_len=14, key_block=0)
  with pytest.raises(config_lib.ConfigError, match="gather_block=-1: must be a positive integer"):
    inference.DRTDecoder(mc, decoder.params, max_len=56, segment_len=14, gather_block=-1)
  with pytest.raises(config_lib.ConfigError, match="chunk_memory='disk'"):
    decoder.start(1, "disk")


def save_initial_checkpoint(config, workdir, step=1):
  """A train.py-style checkpoint (state item only) of a freshly initialised model."""
  mc = config_lib.validate(config)
  trainer = train_lib.Trainer(config, mc, train_lib.make_mesh(config.mesh))
  state = trainer.init_state(config.seed)
  manager = train_lib.checkpoint_manager(os.path.join(workdir, "checkpoints"), 1)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  manager.close()
  return state.params


def test_restore_checks_the_config_and_the_cli_generates(tmp_path):
  config = small_config()
  params = save_initial_checkpoint(config, str(tmp_path))
  restored = generate_lib.restore_params(config, str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  with pytest.raises(generate_lib.CheckpointError, match=r"\['embed'\]\['embedding'\] has shape "
                     r"\(259, 32\), the config's model needs \(259, 48\)"):
    generate_lib.restore_params(small_config(d_model=48), str(tmp_path))
  step_folder = generate_lib.restore_params(config, str(tmp_path / "checkpoints" / "1"))
  jax.tree.map(np.testing.assert_array_equal, step_folder, params)
  with pytest.raises(generate_lib.CheckpointError, match="no checkpoint at step 7"):
    generate_lib.restore_params(config, str(tmp_path / "checkpoints" / "7"))
  with pytest.raises(generate_lib.CheckpointError, match="no checkpoint in"):
    generate_lib.restore_params(config, str(tmp_path / "checkpoints" / "1" / "state"))

  script = ("from tests.helpers import small_config\n"
            "def get_config(): return small_config()\n")
  (tmp_path / "config.py").write_text(script)
  command = [sys.executable, "-m", "drt_jax.generate", "--config", str(tmp_path / "config.py"),
             "--checkpoint", str(tmp_path), "--max_new_tokens", "9", "--temperature", "0.8",
             "--top_k", "5"]
  result = subprocess.run(command + ["--prompt", "Hi"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Hi") and len(result.stdout) > 3, result.stdout
  result = subprocess.run(command + ["--prompt", "Hi", "--prompt", ""], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: --prompt: an empty prompt")
