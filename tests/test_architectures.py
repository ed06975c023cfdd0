"""Every architecture through the one interface (model/architectures.py): causality, incremental
decoding equal to the one-shot forward, and the combinations that cannot work."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax import config as config_lib
from drt_jax import inference
from drt_jax.model import architectures
from drt_jax.model import lm
from tests.helpers import model_config, random_tokens, small_config

C = 7  # chunk_len of small_config
# model overrides of every architecture and retrieval variant; landmark joins when registered.
CASES = {
    "drt": {},
    "drt_random": {"retrieval": "random"},
    "drt_no_gumbel": {"gumbel": False},
    "swa": {"arch": "swa"},
    "full": {"arch": "full", "use_alibi": False},
}


def _available(name):
  try:
    architectures.get(name)
    return True
  except config_lib.ConfigError:
    return False


def _cases():
  cases = dict(CASES)
  if _available("landmark"):
    cases["landmark"] = {"arch": "landmark"}
  return cases


def _build(case, length=5 * C, **overrides):
  config = small_config(**{"topk": 2, "init_std": 0.1, **_cases()[case], **overrides})
  config.data.seq_len = length
  mc = model_config(config)
  model = lm.make_model(mc)
  params = nn.meta.unbox(lm.init_params(model, jax.random.key(0), 1, length))
  return mc, model, params


def test_the_registry_names_every_configurable_architecture():
  assert tuple(architectures.ARCH_MODULES) == config_lib.ARCHS
  for name in ("drt", "swa", "full"):
    assert architectures.get(name).name == name
  with pytest.raises(config_lib.ConfigError, match="model.arch='rnn': must be one of 'drt'"):
    architectures.get("rnn")


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("train", [False, True])
def test_changing_later_tokens_changes_no_earlier_output(case, train):
  _, model, params = _build(case)
  tokens = random_tokens(1, 2, 5 * C)
  rng = jax.random.key(7)
  base = lm.logits(model, params, tokens, train=train, rng=rng)
  for t in (0, C - 1, C, 20):
    changed = tokens.at[:, t + 1:].set(random_tokens(t + 100, 2, 5 * C)[:, t + 1:])
    out = lm.logits(model, params, changed, train=train, rng=rng)
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-5)
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3), "later logits must move"


# Prompt lengths: one token, a chunk less one, a chunk, a chunk and one, three chunks and five
# (across segments of two chunks); then token steps to 5 chunks.
PROMPTS = (1, C - 1, C, C + 1, 3 * C + 5)


@pytest.mark.parametrize("case", list(_cases()))
def test_incremental_decoding_equals_the_one_shot_forward(case):
  mc, model, params = _build(case)
  tokens = np.asarray(random_tokens(2, 2, 5 * C))
  expected = np.asarray(lm.logits(model, params, jnp.asarray(tokens)))
  decoder = architectures.make_decoder(mc, params, max_len=5 * C, segment_len=2 * C)
  for memory in architectures.get(mc.arch).chunk_memories:
    for prompt in PROMPTS:
      session = decoder.start(2, memory)
      hidden = [h for _, h in session.feed(tokens[:, :prompt])]
      hidden += [session.step(tokens[:, t])[:, None] for t in range(prompt, 5 * C)]
      assert session.lengths.tolist() == [5 * C] * 2
      logits = np.asarray(decoder.logits(jnp.concatenate(hidden, axis=1)))
      np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4,
                                 err_msg=f"{case}, {memory} memory, prompt {prompt}")


def test_settings_an_architecture_cannot_take_fail_naming_both():
  mc, _, params = _build("swa")
  decoder = architectures.make_decoder(mc, params, max_len=5 * C, segment_len=2 * C)
  with pytest.raises(config_lib.ConfigError,
                     match="model.arch='swa' with chunk_memory='host': this architecture keeps "
                     "its decoding memory on: 'device'"):
    decoder.start(1, "host")
  with pytest.raises(inference.InputError, match="model.arch='swa' retrieves no chunks"):
    decoder.start(1).retrieved(0)
  assert decoder.retrieval_groups == 0
  with pytest.raises(config_lib.ConfigError, match="model.use_alibi=True: model.arch='full' uses "
                     "RoPE"):
    model_config(small_config(arch="full"))
  with pytest.raises(config_lib.ConfigError, match=r"model.decoder_layers=\(2,\): must be "
                     r"\(lower, group_1, ...\)"):
    model_config(small_config(decoder_layers=(2,)))
  assert model_config(small_config(arch="swa", decoder_layers=(2,))).arch == "swa"


@pytest.mark.gpu
def test_full_attention_through_cudnn_matches_xla_and_decodes():
  """impl="auto" in bf16 on a GPU runs cuDNN's fused causal attention. Its logits, and decoding
  (XLA, masked cache) from it, are as close to the float32 model as XLA's own bf16 forward is:
  bf16 rounding of hidden states moves single logits by a few ulps either way, so the bound is
  relative to XLA's bf16 error, not a fixed tolerance."""
  config = small_config(arch="full", use_alibi=False, init_std=0.1, d_model=128, num_heads=2,
                        num_kv_heads=1, chunk_len=15, dtype="float32")
  config.data.seq_len = 15 * 16
  tokens = random_tokens(0, 2, config.data.seq_len)
  float32 = lm.make_model(model_config(config))
  params = nn.meta.unbox(lm.init_params(float32, jax.random.key(0), 1, config.data.seq_len))
  reference = np.asarray(lm.logits(float32, params, tokens), np.float64)
  config.model.dtype = "bfloat16"
  xla = lm.make_model(model_config(config))
  xla_error = np.abs(np.asarray(lm.logits(xla, params, tokens), np.float64) - reference).max()
  config.model.impl = "auto"
  mc = model_config(config)
  cudnn = lm.make_model(mc)
  hlo = jax.jit(lambda p: lm.logits(cudnn, p, tokens)).lower(params).as_text()
  assert "cudnn" in hlo, "impl='auto' in bf16 must lower to cuDNN's attention"
  got = np.asarray(lm.logits(cudnn, params, tokens), np.float64)
  assert 0 < xla_error < 0.2
  assert np.abs(got - reference).max() <= 2 * xla_error
  decoder = architectures.make_decoder(mc, params, max_len=config.data.seq_len, segment_len=60)
  session = decoder.start(2)
  hidden = [h for _, h in session.feed(np.asarray(tokens)[:, :100])]
  hidden += [session.step(np.asarray(tokens)[:, t])[:, None] for t in range(100, 140)]
  decoded = np.asarray(decoder.logits(jnp.concatenate(hidden, axis=1)), np.float64)
  assert np.abs(decoded - reference[:, :140]).max() <= 2 * xla_error


# A batch of prompts of different lengths: those of PROMPTS, and two chunks (a whole segment, the
# cut of 3 * C + 5 but for its tail); decoded greedily across the next chunk boundary.
RAGGED = PROMPTS + (2 * C,)
RAGGED_DECODE = C + 2


def _greedy(decoder, session, hidden):
  """RAGGED_DECODE greedy tokens from hidden [b, d] on -> (the logits of each, [b, n, vocab])."""
  logits = []
  for _ in range(RAGGED_DECODE):
    logits.append(np.asarray(decoder.logits(hidden)))
    hidden = session.step(logits[-1].argmax(-1))
  return np.stack(logits, axis=1)


@pytest.mark.parametrize("end_prompt", [False, True])
@pytest.mark.parametrize("case", ["drt", "drt_random", "swa", "full", "landmark"])
def test_prompts_of_different_lengths_prefill_together_as_each_alone(case, end_prompt):
  """Session.prefill(tokens, lengths=...): every sequence's next-token logits, greedy decode
  and retrievals equal those of its prompt prefilled alone (batch 1)."""
  if not _available(case.split("_")[0]):
    pytest.skip(f"model.arch={case!r} is not registered")
  # Landmark keeps every earlier block (top-5 of at most 4): on CPU a segment at batch >= 4
  # writes block keys ~1e-6 off batch 1's (another dot kernel), enough to flip a near-tie of its
  # per-head top-2 at these init params (so do two uniform batches, 4 vs 1; 0.2 in the logits).
  mc, _, params = _build(case, **({"topk": 5} if case == "landmark" else {}))
  decoder = architectures.make_decoder(mc, params, max_len=5 * C, segment_len=2 * C)
  tokens = np.asarray(random_tokens(4, len(RAGGED), 5 * C))
  lengths = np.array(RAGGED)
  groups = decoder.retrieval_groups
  for memory in architectures.get(mc.arch).chunk_memories:
    together = decoder.start(len(RAGGED), memory)
    logits = _greedy(decoder, together, together.prefill(tokens, lengths=lengths,
                                                         end_prompt=end_prompt))
    assert together.lengths.tolist() == (lengths + RAGGED_DECODE).tolist()
    for i, n in enumerate(RAGGED):
      alone = decoder.start(1, memory)
      expected = _greedy(decoder, alone, alone.prefill(tokens[i:i + 1, :n],
                                                       end_prompt=end_prompt))
      message = f"{case}, {memory} memory, prompt {n}"
      np.testing.assert_allclose(logits[i], expected[0], rtol=0, atol=1e-5, err_msg=message)
      np.testing.assert_array_equal(logits[i].argmax(-1), expected[0].argmax(-1), message)
      for g in range(groups):
        np.testing.assert_array_equal(together.retrieved(g)[i], alone.retrieved(g)[0], message)
        end, end_alone = together.prompt_end_retrieved(g)[i], alone.prompt_end_retrieved(g)[0]
        assert (end is None) == (end_alone is None), message
        if end is not None:
          np.testing.assert_array_equal(end, end_alone, message)
