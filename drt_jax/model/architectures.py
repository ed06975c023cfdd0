"""The registry of architectures, keyed by `model.arch`: the one interface that training,
inference, eval, generate and the benchmarks use.

An architecture lives in a module `drt_jax/model/<file>.py` (ARCH_MODULES) whose
`ARCHITECTURES = {"<arch>": Architecture(...)}` registers it (one module may hold several, e.g.
baselines.py: swa and full). An Architecture provides:

  module(config, **decoding) -> flax.linen.Module
      The training module: `__call__(tokens int [b, T], *, train: bool)` -> final-normed hidden
      float32 [b, T, d]; row t predicts token t + 1 through the tied head (params["embed"]
      ["embedding"]). It is composed of stage methods (e.g. DRT's chunk_rows, lower_layers,
      encode, retrieval_queries, rank, retrieve, upper_layers, finish), and decoding
      applies the SAME module class with keyword attributes (e.g. mode="step") that choose a
      KV-cached self-attention, so each forward is written once and a training checkpoint
      applies unchanged.
  decoder(config, params, *, max_len, segment_len, **options) -> inference.Decoder
      Incremental decoding (inference.py documents Decoder and Session): `.start(batch,
      chunk_memory)` -> a Session with `feed(tokens)` (iterator of (offset, hidden [b, m, d])),
      `prefill(tokens, end_prompt=False)` -> [b, d], `step(tokens)` -> [b, d], `lengths`
      (int [b]), `retrieved(group)` and `prompt_end_retrieved(group)`; `decoder.logits(hidden)`
      -> float32 [..., vocab]. For any prompt length, the hidden states equal the one-shot
      forward's; end_prompt=True lets an architecture that retrieves once per chunk retrieve
      again at a prompt's end (inference.py; the others ignore it).
  chunk_memories: where decoding may keep its memory ("device", "host"); eval and generate
      refuse the others with one line naming the architecture and the setting.
  retrieval_groups(config) -> int: how many groups `Session.retrieved(group)` answers for
      (0: the architecture retrieves nothing; eval then reports needle_retrieved as null).
  validate(config): the architecture's own field checks (config.ConfigError naming the field),
      run by config.validate before anything is built.
  sequence_multiple: the model field (e.g. "chunk_len") whose value data.seq_len (and a
      one-shot input's length) must be a multiple of; "" for none.

Every architecture lays out eval task samples (data/tasks.py) on model.chunk_len, and decoding
feeds whole chunks of model.chunk_len tokens as batch segments (the rest token by token), so
model.chunk_len is meaningful for every architecture (docs/design.md).
"""

import dataclasses
import importlib
from typing import Any, Callable

from drt_jax.config import ARCHS, ConfigError, ModelConfig

# model.arch -> the module registering it in ARCHITECTURES (imported on first use).
ARCH_MODULES = {
    "drt": "drt_jax.model.drt",
    "swa": "drt_jax.model.baselines",
    "full": "drt_jax.model.baselines",
    "landmark": "drt_jax.model.landmark",
}
assert tuple(ARCH_MODULES) == ARCHS, "config.ARCHS and ARCH_MODULES list the same architectures"


def _no_checks(config: ModelConfig):
  del config


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What one `model.arch` provides (see the module docstring)."""
  name: str
  module: Callable[..., Any]
  decoder: Callable[..., Any]
  chunk_memories: tuple[str, ...] = ("device",)
  retrieval_groups: Callable[[ModelConfig], int] = lambda config: 0
  validate: Callable[[ModelConfig], None] = _no_checks
  sequence_multiple: str = ""


def get(name: str) -> Architecture:
  """The Architecture registered for model.arch=name; ConfigError if none is."""
  if name not in ARCH_MODULES:
    raise ConfigError(f"model.arch={name!r}: must be one of "
                      + ", ".join(map(repr, ARCH_MODULES)))
  try:
    module = importlib.import_module(ARCH_MODULES[name])
  except ModuleNotFoundError as error:
    if error.name != ARCH_MODULES[name]:
      raise
    raise ConfigError(f"model.arch={name!r}: not available in this version "
                      f"({ARCH_MODULES[name]} is missing)") from None
  registered = getattr(module, "ARCHITECTURES", {})
  if name not in registered:
    raise ConfigError(f"model.arch={name!r}: {ARCH_MODULES[name]} registers no such architecture")
  return registered[name]


def make_model(config: ModelConfig, **decoding):
  """The architecture's training module (decoding attributes, e.g. mode="step", on request)."""
  return get(config.arch).module(config, **decoding)


def make_decoder(config: ModelConfig, params, *, max_len: int, segment_len: int, **options):
  """The architecture's inference.Decoder over `params` (float32, unboxed)."""
  return get(config.arch).decoder(config, params, max_len=max_len, segment_len=segment_len,
                                  **options)


def check_chunk_memory(config: ModelConfig, chunk_memory: str, flag: str = "--chunk_memory"):
  """One line naming the architecture and the setting when it cannot keep its memory there."""
  allowed = get(config.arch).chunk_memories
  if chunk_memory not in allowed:
    raise ConfigError(f"model.arch={config.arch!r} with {flag}={chunk_memory!r}: this "
                      "architecture keeps its decoding memory on: " + ", ".join(map(repr, allowed)))
