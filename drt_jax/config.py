"""Typed, validated views of the experiment ConfigDict (configs/*.py).

Validation runs before anything is built or compiled and names the field, the value and what is
allowed, so a bad ablation fails in a second instead of deep inside a trace.
"""

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import ml_collections

ARCHS = ("drt", "swa", "full", "landmark")  # model/architectures.py registers each
LANDMARK_SELECTIONS = ("per_head", "shared")
RETRIEVAL_MODES = ("learned", "random")
RESIDUALS = ("reference", "standard")
# Attention kernels (model/attention_impls.py): "auto" picks by device; the rest are its IMPLS.
IMPLS = ("auto", "mosaic", "triton", "xla")
DTYPES = ("bfloat16", "float32")
WANDB_MODES = ("online", "offline")


class ConfigError(ValueError):
  """A config field has a value that is not allowed."""


def _require(ok: bool, field: str, value: Any, allowed: str):
  if not ok:
    raise ConfigError(f"{field}={value!r}: {allowed}")


def _positive_int(field, value):
  _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, value,
           "must be a positive integer")


def _non_negative_int(field, value):
  _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, field, value,
           "must be an integer >= 0")


def _one_of(field, value, allowed):
  _require(value in allowed, field, value, "must be one of " + ", ".join(map(repr, allowed)))


def _boolean(field, value):
  _require(isinstance(value, bool), field, value, "must be True or False")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a DRT or sliding-window model (field meanings: configs/base.py)."""
  arch: str
  vocab_size: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  decoder_layers: tuple[int, ...]
  encoder_layers: int
  chunk_len: int
  window: int
  use_alibi: bool
  topk: int
  gumbel: bool
  retrieval: str
  residual: str
  softmax_off_by_one: bool
  rms_eps: float
  encoder_rms_eps: float
  rope_theta: float
  init_std: float
  impl: str
  dtype: str
  remat: bool
  landmark_selection: str

  def __post_init__(self):
    f = lambda name: f"model.{name}"  # noqa: E731
    _one_of(f("arch"), self.arch, ARCHS)
    for name in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "mlp_dim", "chunk_len",
                 "topk", "encoder_layers"):
      _positive_int(f(name), getattr(self, name))
    _non_negative_int(f("window"), self.window)
    _require(self.d_model % self.num_heads == 0, f("num_heads"), self.num_heads,
             f"must divide model.d_model={self.d_model}")
    _require(self.num_heads % self.num_kv_heads == 0, f("num_kv_heads"), self.num_kv_heads,
             f"must divide model.num_heads={self.num_heads}")
    _require(self.head_dim % 2 == 0, f("num_heads"), self.num_heads,
             f"d_model / num_heads = {self.head_dim} must be even (RoPE rotates pairs)")
    layers = self.decoder_layers
    _require(isinstance(layers, tuple) and all(isinstance(n, int) and n >= 0 for n in layers),
             f("decoder_layers"), layers, "must be a tuple of integers >= 0")
    _require(sum(layers) >= 1, f("decoder_layers"), layers, "must have at least one layer")
    for name in ("use_alibi", "gumbel", "softmax_off_by_one", "remat"):
      _boolean(f(name), getattr(self, name))
    _one_of(f("retrieval"), self.retrieval, RETRIEVAL_MODES)
    _one_of(f("residual"), self.residual, RESIDUALS)
    _require(self.impl in IMPLS, f("impl"), self.impl,
             "must be one of " + ", ".join(map(repr, IMPLS)) + " (the former 'pallas' is "
             "'auto' on a GPU, 'triton' for the Triton kernels anywhere)")
    _one_of(f("dtype"), self.dtype, DTYPES)
    _one_of(f("landmark_selection"), self.landmark_selection, LANDMARK_SELECTIONS)
    for name in ("rms_eps", "encoder_rms_eps", "rope_theta", "init_std"):
      value = getattr(self, name)
      _require(isinstance(value, (int, float)) and value > 0, f(name), value, "must be > 0")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def chunk_size(self) -> int:
    """S: rows of a chunk in the landmark-inserted stream (chunk_len tokens + 1 landmark)."""
    return self.chunk_len + 1

  @property
  def num_groups(self) -> int:
    return len(self.decoder_layers) - 1

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> "ModelConfig":
    values = model.to_dict()
    values["decoder_layers"] = tuple(values["decoder_layers"])
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"model.{unknown[0]}: unknown field; known fields: {', '.join(sorted(known))}")
    return cls(**values)


def _validate_train(train, data_seq_len):
  for name in ("global_batch_size", "grad_accum_steps", "num_train_steps", "log_every",
               "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
    _positive_int(f"train.{name}", train[name])
  _require(isinstance(train.eval_batch_size, int) and not isinstance(train.eval_batch_size, bool)
           and train.eval_batch_size >= 0, "train.eval_batch_size", train.eval_batch_size,
           "must be an integer >= 0 (0 = the training micro-batch)")
  _require(train.global_batch_size % train.grad_accum_steps == 0, "train.grad_accum_steps",
           train.grad_accum_steps, f"must divide train.global_batch_size={train.global_batch_size}")
  _require(train.learning_rate > 0, "train.learning_rate", train.learning_rate, "must be > 0")
  _non_negative_int("train.warmup_steps", train.warmup_steps)
  _require(train.warmup_steps <= train.num_train_steps, "train.warmup_steps", train.warmup_steps,
           f"must be <= train.num_train_steps={train.num_train_steps}")
  _require(0.0 <= train.lr_floor <= 1.0, "train.lr_floor", train.lr_floor,
           "must be in [0, 1] (a fraction of the peak learning rate)")
  for name in ("b1", "b2"):
    _require(0.0 <= train[name] < 1.0, f"train.{name}", train[name], "must be in [0, 1)")
  _require(train.eps > 0, "train.eps", train.eps, "must be > 0")
  _require(train.weight_decay >= 0, "train.weight_decay", train.weight_decay, "must be >= 0")
  _require(train.grad_clip >= 0, "train.grad_clip", train.grad_clip, "must be >= 0 (0 = off)")
  _require(isinstance(train.init_from, str), "train.init_from", train.init_from,
           "must be a run folder or '' (random init)")
  _positive_int("train.max_nonfinite_steps", train.max_nonfinite_steps)
  _require(isinstance(train.wandb_project, str), "train.wandb_project", train.wandb_project,
           "must be a W&B project name or '' (no W&B)")
  _one_of("train.wandb_mode", train.wandb_mode, WANDB_MODES)


def _validate_mesh(mesh):
  sizes = mesh.to_dict()
  for name, size in sizes.items():
    _require(isinstance(size, int) and (size >= 1 or size == -1), f"mesh.{name}", size,
             "must be a positive integer or -1 (fill with the remaining devices)")
  _require(sum(size == -1 for size in sizes.values()) <= 1, "mesh", sizes,
           "at most one axis may be -1")


def _check_finite(node, prefix=""):
  """Every float field: NaN or inf is never a setting (e.g. train.learning_rate=inf)."""
  items = node.items() if isinstance(node, dict) else ()
  for name, value in items:
    field = f"{prefix}{name}"
    if isinstance(value, dict):
      _check_finite(value, field + ".")
    elif isinstance(value, float):
      _require(math.isfinite(value), field, value, "must be a finite number")


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
  """Checks every field; returns the typed model config. Raises ConfigError naming the field.

  model.vocab_size=0 is replaced, in `config` itself, by the vocabulary size of data.tokenizer, so
  that what is saved with a run (config.json) holds the number.
  """
  if config.model.vocab_size == 0:
    config.model.vocab_size = _tokenizer_vocab_size(config.data.tokenizer)
  _check_finite(config.to_dict())
  from drt_jax.model import architectures  # it imports this module

  model = ModelConfig.from_config(config.model)
  architecture = architectures.get(model.arch)
  architecture.validate(model)
  seq_len = config.data.seq_len
  _positive_int("data.seq_len", seq_len)
  if architecture.sequence_multiple:  # a model field, e.g. "chunk_len"
    multiple = getattr(model, architecture.sequence_multiple)
    _require(seq_len % multiple == 0, "data.seq_len", seq_len,
             f"must be a multiple of model.{architecture.sequence_multiple}={multiple} "
             f"(e.g. {max(1, seq_len // multiple) * multiple})")
  _validate_train(config.train, seq_len)
  _validate_mesh(config.mesh)
  return model


def _tokenizer_vocab_size(tokenizer: str) -> int:
  from drt_jax.data import DataError
  from drt_jax.data import tokenizer as tokenizer_lib

  try:
    return tokenizer_lib.make_tokenizer(tokenizer).vocab_size
  except DataError as error:
    raise ConfigError(f"model.vocab_size=0 takes the vocabulary size of data.tokenizer, but: "
                      f"{error}") from None


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per raw token (forward + backward = 3x forward), matmuls only.

  Counts the dense projections, attention over the visible window, the chunk encoder, the GCA
  over k retrieved chunks and the LM head; used for MFU.
  """
  d, f, h = model.d_model, model.mlp_dim, model.head_dim * model.num_heads
  kv = model.head_dim * model.num_kv_heads
  if model.arch in ("swa", "full"):
    positions_per_token = 1.0
    layers, upper = sum(model.decoder_layers), 0
  elif model.arch == "landmark":
    positions_per_token = model.chunk_size / model.chunk_len
    layers, upper = sum(model.decoder_layers), 0
  else:
    positions_per_token = model.chunk_size / model.chunk_len
    layers, upper = model.decoder_layers[0], sum(model.decoder_layers[1:])
  length = seq_len * positions_per_token
  # Full causal attention (and landmark attention's causal, unwindowed grouped softmax): a query
  # sees (T + 1) / 2 keys on average.
  visible = ((length + 1) / 2 if model.arch in ("full", "landmark") else
             min(model.window + 1, length))
  block = 2 * d * (h + 2 * kv) + 2 * h * d + 3 * 2 * d * f + 2 * 2 * visible * h
  forward = (layers + upper) * block
  if model.arch == "drt":
    gca = 2 * d * h * 2 + 2 * 2 * min(model.topk, length / model.chunk_size) * model.chunk_size * h
    encoder = model.encoder_layers * (4 * 2 * d * h + 3 * 2 * d * f + 2 * 2 * model.chunk_size * h)
    forward += upper * gca + encoder + 2 * 2 * d * d
  forward = forward * positions_per_token + 2 * d * model.vocab_size
  return 3.0 * forward


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports a config file by path (as `--config` would) and returns its get_config(). The files
  import each other as the installed `configs` package (`from configs import base`)."""
  import importlib.util
  import os

  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def apply_override(config: ml_collections.ConfigDict, assignment: str):
  """Applies "section.field=value" (value parsed as a Python literal, else kept as a string)."""
  import ast

  name, _, text = assignment.partition("=")
  if not _:
    raise ConfigError(f"override {assignment!r}: expected field=value")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  *sections, field = name.split(".")
  node = config
  for section in sections:
    if not isinstance(node, ml_collections.ConfigDict) or section not in node:
      raise ConfigError(f"override {assignment!r}: {name} is not a config field")
    node = node[section]
  if not isinstance(node, ml_collections.ConfigDict) or field not in node:
    raise ConfigError(f"override {assignment!r}: {name} is not a config field")
  try:
    node[field] = value
  except TypeError:
    raise ConfigError(f"override {assignment!r}: {name} must be a {type(node[field]).__name__} "
                      f"(got {value!r})") from None
