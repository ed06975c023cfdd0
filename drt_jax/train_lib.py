"""Everything the training loop needs, importable and testable: mesh, sharded state, optimizer,
the jitted train/eval steps and checkpointing (params, optimizer and data iterator together; or
another run's params alone, for train.init_from)."""

import contextlib
import dataclasses
import glob
import json
import os
from typing import Any

import flax.linen as nn
import flax.struct
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from drt_jax.config import ConfigError, ModelConfig
from drt_jax.model import lm

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh; an axis of -1 takes the devices the others leave."""
  devices = jax.devices() if devices is None else devices
  sizes = {axis: mesh_config[axis] for axis in MESH_AXES}
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  for axis, size in sizes.items():
    if size == -1:
      if len(devices) % fixed:
        raise ConfigError(f"mesh.{axis}=-1: {len(devices)} devices are not divisible by the other "
                          f"axes' product {fixed}")
      sizes[axis] = len(devices) // fixed
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ConfigError(f"mesh={sizes}: product must equal the {len(devices)} available devices")
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def check_batch_divisibility(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.train.global_batch_size // config.train.grad_accum_steps
  if micro % shards:
    raise ConfigError(f"train.global_batch_size={config.train.global_batch_size}: each of the "
                      f"{config.train.grad_accum_steps} micro-batches ({micro} sequences) must "
                      f"split evenly over the {shards} data-parallel shards of the mesh")
  eval_batch = config.train.eval_batch_size
  if eval_batch % shards:
    raise ConfigError(f"train.eval_batch_size={eval_batch}: must split evenly over the {shards} "
                      "data-parallel shards of the mesh")


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0, then half-cosine down to lr_floor * peak at num_train_steps (§6)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
      decay_steps=max(train.num_train_steps, train.warmup_steps + 1),
      end_value=train.learning_rate * train.lr_floor)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with decoupled decay on every parameter and global-norm clipping (§6). Like the
  reference's GradScaler, a step whose gradients are not finite is skipped."""
  parts = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                           weight_decay=train.weight_decay))
  return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=1_000_000)


# The config field behind each logical axis of a param, for the error naming what cannot be split.
_AXIS_FIELDS = {"vocab": "model.vocab_size", "embed": "model.d_model", "mlp": "model.mlp_dim",
                "heads": "model.num_heads", "kv_heads": "model.num_kv_heads"}


def check_param_divisibility(boxed_params, mesh: jax.sharding.Mesh, rules):
  """Raises ConfigError naming the mesh axis and the model field when a param's dimension cannot
  be split evenly over the mesh axes its logical axis maps to (XLA's IndivisibleError otherwise,
  deep inside the first jit). boxed_params: eval_shape'd params with logical axis names."""
  specs = nn.get_partition_spec(boxed_params)
  shapes = nn.meta.unbox(boxed_params)
  flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
  for (path, spec), leaf in zip(flat_specs, jax.tree.leaves(shapes)):
    for dim, logical, axes in zip(leaf.shape, spec, nn.logical_to_mesh_axes(spec, rules)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      parts = int(np.prod([mesh.shape[axis] for axis in axes]))
      if dim % parts:
        sizes = ", ".join(f"mesh.{axis}={mesh.shape[axis]}" for axis in axes)
        field = _AXIS_FIELDS.get(logical, f"axis '{logical}'")
        raise ConfigError(f"{sizes}: cannot split {field}={dim} (the {logical!r} axis of param "
                          f"{jax.tree_util.keystr(path)}) into {parts} equal parts; choose mesh "
                          "sizes that divide it")


def tree_is_finite(tree) -> jax.Array:
  """True (a replicated bool scalar) when every floating leaf of `tree` is free of NaN and inf."""
  leaves = [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


@dataclasses.dataclass
class Trainer:
  """The model, mesh, optimizer and compiled steps of one experiment."""
  config: ml_collections.ConfigDict
  model_config: ModelConfig
  mesh: jax.sharding.Mesh

  def __post_init__(self):
    check_batch_divisibility(self.config, self.mesh)
    self.model = lm.make_model(self.model_config)
    self.optimizer = make_optimizer(self.config.train)
    self.rules = tuple(self.config.logical_axis_rules)
    self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
    self.replicated = NamedSharding(self.mesh, P())
    abstract = jax.eval_shape(self._boxed_state, jax.random.key(0))
    check_param_divisibility(abstract.params, self.mesh, self.rules)
    self.state_shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(abstract), self.mesh, self.rules)
    self.abstract_state = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        nn.meta.unbox(abstract), self.state_shardings)

  def _boxed_state(self, rng):
    params = lm.init_params(self.model, rng, 1, self.config.data.seq_len)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params))

  @contextlib.contextmanager
  def _context(self):
    """Mesh and logical axis rules active while tracing (activation sharding constraints)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def init_state(self, seed: int) -> TrainState:
    with self._context():
      init = jax.jit(lambda rng: nn.meta.unbox(self._boxed_state(rng)),
                     out_shardings=self.state_shardings)
      return init(jax.random.key(seed))

  def state_from_params(self, params) -> TrainState:
    """Step 0 and a fresh optimizer state around given params (unboxed, as abstract_state's):
    a run that starts from another run's params."""
    with self._context():
      start = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                           opt_state=self.optimizer.init(p)),
                      out_shardings=self.state_shardings)
      return start(params)

  def global_batch(self, local_batch: dict) -> dict:
    """Host-local numpy batch rows -> global arrays sharded over the data axes."""
    return {name: jax.make_array_from_process_local_data(self.batch_sharding, value)
            for name, value in local_batch.items()}

  def _loss(self, params, batch, rng, train):
    return lm.loss_terms(self.model, params, batch["inputs"], train=train, rng=rng,
                         target_weights=batch.get("target_weights"))

  def _train_step(self, state: TrainState, batch: dict):
    accum = self.config.train.grad_accum_steps
    step_rng = jax.random.fold_in(jax.random.key(self.config.seed), state.step)

    def micro_grads(i, micro_batch):
      def loss_fn(params):
        total, count = self._loss(params, micro_batch, jax.random.fold_in(step_rng, i), True)
        return total, count
      (total, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      return total, count, grads

    micro = jax.tree.map(lambda x: x.reshape((accum, -1) + x.shape[1:]), batch)
    if accum == 1:
      total, count, grads = micro_grads(0, jax.tree.map(lambda x: x[0], micro))
    else:
      def body(carry, inputs):
        i, micro_batch = inputs
        t, c, g = micro_grads(i, micro_batch)
        return jax.tree.map(jnp.add, carry, (t, c, g)), None
      zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
               jax.tree.map(jnp.zeros_like, state.params))
      (total, count, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    # Sum of per-token gradients / all scored tokens: a token-weighted mean like the reference.
    with jax.named_scope("optimizer"):
      grads = jax.tree.map(lambda g: g / count, grads)
      updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads),
               "learning_rate": learning_rate_schedule(self.config.train)(state.step),
               # Steps of the run so far whose update apply_if_finite skipped (NaN/inf gradients).
               "skipped_steps": opt_state.total_notfinite,
               "tokens": count}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def lower_train_step(self, state: TrainState, batch: dict):
    """The step (state donated) lowered for state and batch, concrete or abstract
    (e.g. abstract_state and jax.ShapeDtypeStruct inputs: nothing is allocated)."""
    with self._context():
      step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                     out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
      return step.lower(state, batch)

  def compile_train_step(self, state: TrainState, batch: dict):
    """AOT-compiled step (state donated); returns the compiled callable."""
    return self.lower_train_step(state, batch).compile()

  def compile_finite_check(self, state: TrainState):
    """AOT-compiled state -> True when no float in it is NaN/inf (checked before every save)."""
    with self._context():
      check = jax.jit(tree_is_finite, in_shardings=(self.state_shardings,),
                      out_shardings=self.replicated)
      return check.lower(state).compile()

  def _eval_rng(self):
    """The fixed key of every eval (the rng stream the model may draw from; outside training none
    does: random retrieval's eval ranking is retrieval.inference_noise)."""
    return jax.random.key(self.config.seed + 1)

  def compile_eval_step(self, params, batch: dict):
    """AOT-compiled eval: (params, batch) -> (summed loss, scored tokens), no Gumbel noise."""
    with self._context():
      step = jax.jit(lambda p, b: self._loss(p, b, self._eval_rng(), False),
                     in_shardings=(self.state_shardings.params, self.batch_sharding),
                     out_shardings=self.replicated)
      return step.lower(params, batch).compile()

  def compile_answer_step(self, params, batch: dict):
    """AOT-compiled task eval: (params, {"inputs", "answer_start", "answer"}) -> float32
    [batch, A], 1 where a teacher-forced greedy answer token is right (lm.answer_hits)."""
    with self._context():
      step = jax.jit(lambda p, b: lm.answer_hits(self.model, p, b["inputs"], b["answer_start"],
                                                 b["answer"], rng=self._eval_rng()),
                     in_shardings=(self.state_shardings.params, self.batch_sharding),
                     out_shardings=self.replicated)
      return step.lower(params, batch).compile()


def checkpoint_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """Async, keep-N manager. Orbax writes each step into a temporary folder and renames it when
  complete, so a run killed mid-save leaves no checkpoint that restores wrong.

  The folder is made by the first save (a run refused before its first step leaves none). Step
  folders are created synchronously, inside `save`: created in the background (orbax's default),
  a folder that cannot be made (read-only file system) leaves the writer threads waiting for a
  "directory created" signal until orbax's 20-minute timeout, instead of failing at once.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=False, enable_async_checkpointing=True,
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the message names the step and the newest one kept."""


def one_line(error: BaseException, limit: int = 300) -> str:
  """The first line of an error, cut to `limit` characters (tensorstore's can be huge)."""
  text = (str(error).strip().splitlines() or [""])[0]
  text = text if len(text) <= limit else text[:limit] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, data_iterator):
  """Starts the async save of `state` (raising CheckpointSaveError, e.g. for a read-only or full
  file system, with the earlier saves intact)."""
  step = int(state.step)
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))
  except Exception as error:  # whatever the file system raised, through orbax or tensorstore
    raise _save_error(manager, error, step) from None


def check_saves(manager: ocp.CheckpointManager, *, wait: bool = False, step: int | None = None):
  """Raises CheckpointSaveError if the background save (of `step`, the newest started) failed;
  wait: after it finished."""
  try:
    manager.wait_until_finished() if wait else manager.check_for_errors()
  except Exception as error:
    raise _save_error(manager, error, step) from None


def _save_error(manager, error, step=None):
  kept = [s for s in manager.all_steps() if s != step]
  newest = f"step {max(kept)} is the newest checkpoint kept" if kept else "no checkpoint is kept"
  which = "a checkpoint" if step is None else f"the checkpoint of step {step}"
  return CheckpointSaveError(f"could not save {which} in {manager.directory} "
                             f"({one_line(error)}); {newest}")


def restore_newest(manager: ocp.CheckpointManager, abstract_state, data_iterator, *, say,
                   all_agree=lambda ok: ok):
  """The newest checkpoint that restores completely, walking back past broken ones.

  A step folder that is empty, partial or has a truncated or corrupted array file is skipped with
  one line (`say`) naming the step and why, and moved to <run>/unrestorable/<step> so that the
  run can save that step again. all_agree(ok) -> bool: True when every process restored the step
  (a step one process cannot read is skipped by all). Returns (state, step); (None, None) when
  the folder holds no step; raises CheckpointError when none restores.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  reasons = []
  for step in steps:
    try:
      state, reason = restore_checkpoint(manager, abstract_state, data_iterator, step), None
    except Exception as error:  # what a broken file raises depends on the layer that reads it
      state, reason = None, one_line(error)
    if all_agree(reason is None):
      for skipped, why in reasons:
        _move_aside(manager, skipped)
      return state, step
    reasons.append((step, reason or "another process could not restore it"))
    say(f"checkpoint step {step} does not restore, skipped: {reasons[-1][1]}")
  if not steps:
    return None, None
  raise CheckpointError(f"no checkpoint in {manager.directory} restores (steps "
                        f"{', '.join(str(s) for s, _ in reasons)}); move them away to start "
                        "the run again from step 0")


def _move_aside(manager: ocp.CheckpointManager, step: int):
  """<run>/checkpoints/<step> -> <run>/unrestorable/<step>[.N] (process 0; kept for a look)."""
  if jax.process_index() == 0:
    aside = os.path.join(os.path.dirname(str(manager.directory)), "unrestorable")
    os.makedirs(aside, exist_ok=True)
    target, n = os.path.join(aside, str(step)), 0
    while os.path.exists(target):
      n += 1
      target = os.path.join(aside, f"{step}.{n}")
    os.rename(os.path.join(str(manager.directory), str(step)), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
  manager.reload()


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state, data_iterator, step=None):
  """Restores state (resharded to the abstract state's shardings: any mesh, any number of
  processes) and rewinds the iterator in place."""
  step = manager.latest_step() if step is None else step
  # grain keeps one file per process, named by index and count, in orbax's <dir>/<step>/data.
  data_dir = os.path.join(manager.directory, str(step), "data")
  own_file = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  args = {"state": ocp.args.StandardRestore(abstract_state)}
  if os.path.exists(os.path.join(data_dir, own_file)):
    args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  if "data" not in args:
    # Saved by another number of processes. Every process's iterator stood at the same batch
    # index (data/pipeline.py splits each global batch by rows), so process 0's state is anyone's.
    saved = glob.glob(os.path.join(data_dir, "process_0-of-*.json"))
    if not saved:
      raise FileNotFoundError(f"{data_dir}: no data-iterator state (process_0-of-N.json)")
    with open(saved[0]) as f:
      data_iterator.set_state(json.load(f))
  return restored.state


class CheckpointError(ValueError):
  """A checkpoint that is missing or does not fit the config; the message names it."""


def find_checkpoint(path: str, label: str, error=CheckpointError, step: int | None = None):
  """(checkpoints folder, step) of `path`: a run folder (train.py's --workdir), its checkpoints/
  folder or one step's folder in it; step None = the folder's newest. Raises `error` naming
  `label`=path (the flag or field it came from) when there is no such checkpoint."""
  folder = os.path.abspath(os.path.join(path, "checkpoints"))
  if not os.path.isdir(folder):
    folder = os.path.abspath(path)
    if os.path.basename(folder).isdigit() and step is None:  # <run>/checkpoints/<step>
      folder, step = os.path.dirname(folder), int(os.path.basename(folder))
  if not os.path.isdir(folder):
    raise error(f"{label}={path!r}: no such folder")
  with _params_reader(folder) as manager:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise error(f"{label}={path!r}: no checkpoint" + ("" if step is None else f" at step {step}")
                  + f" in {folder}")
  return folder, step


def restore_params(folder: str, step: int, abstract_params, error=CheckpointError):
  """The params alone of checkpoint `step` in `folder` (find_checkpoint), loaded into
  abstract_params' shapes and shardings (ShapeDtypeStructs); `error` if a shape differs."""
  where = f"{folder} step {step}"
  with _params_reader(folder) as manager:
    # Orbax restores whatever shape was saved: a checkpoint of another model must be caught here,
    # not by a shape error deep inside a trace.
    saved, wanted = ({jax.tree_util.keystr(p): tuple(leaf.shape)
                      for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
                     for tree in (manager.item_metadata(step)["state"]["params"], abstract_params))
    for name in sorted(set(saved) | set(wanted)):
      if saved.get(name) != wanted.get(name):
        raise error(f"{where}: param {name} has shape {saved.get(name, '(absent)')}, the config's "
                    f"model needs {wanted.get(name, '(absent)')}; the checkpoint is from another "
                    "model config")
    target = {"params": abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  return restored.state["params"]


@contextlib.contextmanager
def _params_reader(folder: str):
  # The data iterator's handler too, only so that orbax does not warn about an unknown item.
  manager = ocp.CheckpointManager(
      folder, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})
  try:
    yield manager
  finally:
    manager.close()


# Model fields that change neither the params' shapes nor their meaning: how the model is computed
# (impl, dtype, remat) and how many chunks it retrieves, how (topk, gumbel). train.init_from may
# load params of a run that differs from this one in these only.
PARAM_FREE_MODEL_FIELDS = ("impl", "dtype", "remat", "topk", "gumbel")


def load_params(path: str, abstract_params, model: dict):
  """The params of another run's checkpoint, for train.init_from (fine-tuning, length curricula).

  path: as find_checkpoint's (a run folder: its newest step). abstract_params: ShapeDtypeStructs
  carrying the shardings to load into. model: this run's config.model, compared with the `model`
  of the source run's config.json first. Returns (params, "<folder> step N"); raises ConfigError
  naming train.init_from.
  """
  label = "train.init_from"
  folder, step = find_checkpoint(path, label, ConfigError)
  config_path = os.path.join(os.path.dirname(folder), "config.json")
  if not os.path.exists(config_path):
    raise ConfigError(f"{label}={path!r}: no {config_path} (train.py writes it) to check that "
                      "run's model config against this one")
  with open(config_path) as f:
    source = json.load(f)["model"]
  current = json.loads(json.dumps(model))  # tuples as lists, as in config.json
  for name in list(current) + [name for name in source if name not in current]:
    if name not in PARAM_FREE_MODEL_FIELDS and source.get(name) != current.get(name):
      raise ConfigError(
          f"{label}={path!r}: that run has model.{name}={source.get(name)!r}, this one "
          f"model.{name}={current.get(name)!r}; only model." + ", model.".join(
              PARAM_FREE_MODEL_FIELDS) + " may differ from the run whose params are loaded")
  return restore_params(folder, step, abstract_params, ConfigError), f"{folder} step {step}"
