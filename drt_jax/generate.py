"""`python -m drt_jax.generate --checkpoint RUN_DIR --prompt TEXT ... [--config.field=value]`

Continues prompts of any length with a trained model of any architecture: prefill, then
token-by-token decoding with greedy, temperature or top-k sampling (drt_jax/inference.py holds
the state). The config is the run's own (run_config.py: RUN_DIR/config.json, overrides on top,
every change printed); `--config configs/<name>.py` starts from a file instead. Also home of the
flags and the restore that eval.py shares (train_lib reads the checkpoint).
"""

import functools
import sys
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from drt_jax import cli
from drt_jax import config as config_lib
from drt_jax import inference
from drt_jax import run_config
from drt_jax import train_lib
from drt_jax.train_lib import CheckpointError
from drt_jax.data import DataError
from drt_jax.data import tokenizer as tokenizer_lib
from drt_jax.model import architectures
from drt_jax.model import lm

# The errors every inference program reports as one line.
ERRORS = (config_lib.ConfigError, DataError, inference.InputError, CheckpointError,
          run_config.RunConfigError)


def define_session_flags(max_len_help: str):
  """Flags every inference program shares: config, checkpoint and the decoding session's sizes."""
  config_flags.DEFINE_config_file(
      "config", None, "Config: default the run's own (RUN_DIR/config.json); a configs/*.py file "
      "or a saved config.json. --config.section.field=value overrides it.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Run folder (train.py --workdir) or its checkpoints/ "
                      "folder (the latest step is used), or one step's folder in it.")
  flags.DEFINE_list("allow_change", [], "Model fields that may differ from what the run was "
                    "trained with, e.g. model.topk (run_config.py; model.impl, dtype, remat and "
                    "gumbel may always).")
  flags.DEFINE_integer("max_len", None, max_len_help)
  flags.DEFINE_integer("segment_len", None, "Tokens per prefill segment (default: data.seq_len, "
                       "the training length).")
  flags.DEFINE_enum("chunk_memory", "device", list(inference.CHUNK_MEMORIES),
                    "Where the chunk K/V memory lives ('host' for long contexts).")
  flags.DEFINE_bool("prompt_end_retrieval", True, "DRT: answer with a retrieval made after the "
                    "prompt's last token (inference.py, 'Prompt-end retrieval'); "
                    "--noprompt_end_retrieval: with the one serving the last token's chunk, as "
                    "the one-shot forward does. Other architectures ignore it.")


def _define_flags():
  # Defined only when run as a program: generate.py is also imported as a library (eval.py).
  define_session_flags("Longest prompt + generation accepted (default: the longest prompt + "
                       "max_new_tokens).")
  flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy; else sample softmax(logits / T).")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


def load_run(config: ml_collections.ConfigDict, checkpoint: str, allow_change=(), say=print):
  """The validated model config, params and step of a run, after checking config against the
  run's config.json (every changed field said, run_config.changes_from_run)."""
  allow_change = run_config.check_allow_change(allow_change)
  model_config = config_lib.validate(config)
  for line in run_config.changes_from_run(config, checkpoint, allow_change):
    say(f"config: {line}")
  folder, step = train_lib.find_checkpoint(checkpoint, "--checkpoint")
  return model_config, restore_params(config, folder, step), step


def restore_params(config: ml_collections.ConfigDict, checkpoint: str, step: int | None = None):
  """The float32 params of a train.py checkpoint, checked against config's model first, on one
  device. checkpoint: the run folder (--workdir), its checkpoints/ folder or one step's folder.
  step: None = the latest."""
  model_config = config_lib.validate(config)
  folder, step = train_lib.find_checkpoint(checkpoint, "--checkpoint", step=step)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  expected = jax.eval_shape(lambda: nn.meta.unbox(lm.init_params(
      lm.make_model(model_config), jax.random.key(0), 1, model_config.chunk_len)))
  expected = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          expected)
  return train_lib.restore_params(folder, step, expected)


@functools.partial(jax.jit, static_argnames=("temperature", "top_k"))
def sample(logits, rng, *, temperature: float, top_k: int):
  """float32 [b, vocab] -> int32 [b]: the argmax if temperature == 0, else a draw from
  softmax(logits / temperature) over the top_k most likely tokens (top_k 0 = all)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits / temperature).astype(jnp.int32)


def check_sampling(max_new_tokens, temperature, top_k, vocab_size: int | None = None):
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise inference.InputError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
  if not temperature >= 0 or temperature == float("inf"):
    raise inference.InputError(f"temperature={temperature!r}: must be a finite number >= 0")
  if not isinstance(top_k, int) or top_k < 0:
    raise inference.InputError(f"top_k={top_k!r}: must be an integer >= 0")
  if vocab_size is not None and top_k > vocab_size:
    raise inference.InputError(f"top_k={top_k}: must be at most model.vocab_size={vocab_size} "
                               "(0 = all tokens)")


def start(decoder: inference.Decoder, prompts: Sequence[np.ndarray], chunk_memory: str,
          prompt_end_retrieval: bool = True):
  """Prefills the prompts (1-D int, any lengths) as one batch -> (session, last hidden state
  [b, d]); each sequence's state is the one prefilling it alone gives (Session.prefill with
  lengths), and decoding goes on from each one's own position. prompt_end_retrieval:
  Session.prefill's end_prompt.
  """
  lengths = np.array([len(p) for p in prompts])
  tokens = np.zeros((len(prompts), lengths.max()), np.int32)
  for row, prompt in zip(tokens, prompts):
    row[:len(prompt)] = prompt
  session = decoder.start(len(prompts), chunk_memory)
  return session, session.prefill(tokens, lengths=lengths, end_prompt=prompt_end_retrieval)


def generate(decoder: inference.Decoder, prompts: Sequence, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             chunk_memory: str = "device", prompt_end_retrieval: bool = True) -> np.ndarray:
  """Continues every prompt by max_new_tokens tokens -> int32 [len(prompts), max_new_tokens].

  prompt_end_retrieval (default on): DRT retrieves again where a prompt ends inside a chunk
  (inference.py, "Prompt-end retrieval"); off, the tokens are those of the one-shot forward.
  """
  return continue_prompts(decoder, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                          seed=seed, chunk_memory=chunk_memory,
                          prompt_end_retrieval=prompt_end_retrieval)[0]


def check_prompt_end_retrieval(value):
  if not isinstance(value, bool):
    raise inference.InputError(f"prompt_end_retrieval={value!r}: must be True or False")


def continue_prompts(decoder: inference.Decoder, prompts: Sequence, max_new_tokens: int, *,
                     temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                     chunk_memory: str = "device", prompt_end_retrieval: bool = True
                     ) -> tuple[np.ndarray, inference.Session]:
  """generate, also returning the session (e.g. for the chunks each landmark retrieved); its
  last generated token has not been fed."""
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if not prompts:
    raise inference.InputError("no prompts")
  check_sampling(max_new_tokens, temperature, top_k, decoder.config.vocab_size)
  check_prompt_end_retrieval(prompt_end_retrieval)
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise inference.InputError(f"prompt {i} is empty")
    if len(prompt) + max_new_tokens > decoder.max_len:
      raise inference.InputError(
          f"prompt {i} has {len(prompt)} tokens: with max_new_tokens={max_new_tokens} longer "
          f"than max_len={decoder.max_len}")
  session, hidden = start(decoder, prompts, chunk_memory, prompt_end_retrieval)
  rng = jax.random.key(seed)
  tokens = []
  for i in range(max_new_tokens):
    token = sample(decoder.logits(hidden), jax.random.fold_in(rng, i), temperature=temperature,
                   top_k=top_k)
    tokens.append(token)
    if i + 1 < max_new_tokens:
      hidden = session.step(token)
  return np.asarray(jnp.stack(tokens, axis=1)), session


def main(argv):
  cli.start(argv)
  f = flags.FLAGS
  try:
    check_sampling(f.max_new_tokens, f.temperature, f.top_k, f.config.model.vocab_size)
    model_config = config_lib.validate(f.config)
    architectures.check_chunk_memory(model_config, f.chunk_memory)
    tokenizer = tokenizer_lib.make_tokenizer(f.config.data.tokenizer)
    prompts = [tokenizer.encode(text) for text in f.prompt]
    if any(len(p) == 0 for p in prompts):
      raise inference.InputError("--prompt: an empty prompt has nothing to continue")
    longest = max(len(p) for p in prompts) + f.max_new_tokens
    model_config, params, _ = load_run(f.config, f.checkpoint, f.allow_change,
                                       say=lambda line: print(line, file=sys.stderr))
    decoder = architectures.make_decoder(model_config, params, max_len=f.max_len or longest,
                                         segment_len=f.segment_len or f.config.data.seq_len)
    outputs = generate(decoder, prompts, f.max_new_tokens, temperature=f.temperature,
                       top_k=f.top_k, seed=f.seed, chunk_memory=f.chunk_memory,
                       prompt_end_retrieval=f.prompt_end_retrieval)
  except ERRORS as error:
    raise SystemExit(f"error: {error}") from None
  for text, output in zip(f.prompt, outputs):
    sys.stdout.write(text + tokenizer.decode(output) + "\n")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["checkpoint", "prompt"])
  app.run(main, argv=run_config.with_run_config(sys.argv))
