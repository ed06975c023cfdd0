"""Compiled train-step time, tokens/s and MFU of one or more configs, measured in one run.

  python bench/train_step.py --config configs/drt_pg19.py --baseline configs/swa_pg19.py \
      --set train.global_batch_size=4 --set data.source=pydoc --out FILE.json [--profile_steps 3]
  python bench/train_step.py --config configs/drt_pg19.py --archs drt,swa,full,landmark \
      --full_seq_len 8192 --out FILE.json

--archs measures each config as every architecture named (model.arch set, plus what the
architecture needs: model.use_alibi=False for full, model.impl=xla for landmark); --full_seq_len
gives full attention its own data.seq_len (its [T, T] attention may not fit at the others' length).

Batches are random token ids (no input pipeline in the timing); each step is timed to completion
and the median over --steps steps after --warmup steps is reported. With --baseline, every
config's step time is also given as a ratio to the baseline's. MFU is given two ways: the
project's matmul count (drt_jax.config.flops_per_token) and 6 x non-embedding params per position
plus attention (`mfu_6n`). --profile_steps N traces N more steps of each config with jax.profiler
(into --profile_dir/<config>/, with the compiled step's HLO text) and prints its top device ops
(bench/trace_top_ops.py); the summary goes into the JSON too. XLA runs most of a GPU step as
command buffers, which hide each kernel's scope from the trace: --no_command_buffers turns them off
for a run whose profile is read by scope (its step times are then not the default's).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from drt_jax import config as config_lib  # noqa: E402
from drt_jax import hardware  # noqa: E402
from drt_jax import train_lib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trace_top_ops  # noqa: E402


def flops_per_token_6n(model_config, seq_len: int, non_embedding_params: int) -> float:
  """6 x non-embedding params per position, plus 12 x (keys attended) x heads x head_dim per
  attention layer and position (PaLM's convention; sliding-window keys = min(W + 1, length),
  GCA keys = topk x chunk_len, encoder keys = chunk_size). DRT's landmark rows are positions too.
  The tied LM head is embedding params, so its matmul is not counted here."""
  m = model_config
  width = m.head_dim * m.num_heads
  if m.arch == "swa":
    positions, length = 1.0, seq_len
    keys = sum(m.decoder_layers) * min(m.window + 1, length)
  elif m.arch in ("full", "landmark"):  # causal: (length + 1) / 2 keys per position on average
    positions = 1.0 if m.arch == "full" else m.chunk_size / m.chunk_len
    length = seq_len * positions
    keys = sum(m.decoder_layers) * (length + 1) / 2
  else:
    positions = m.chunk_size / m.chunk_len
    length = seq_len * positions
    keys = (sum(m.decoder_layers) * min(m.window + 1, length)
            + sum(m.decoder_layers[1:]) * min(m.topk, length / m.chunk_size) * m.chunk_len
            + m.encoder_layers * m.chunk_size)
  return positions * (6.0 * non_embedding_params + 12.0 * keys * width)


# What each --archs entry sets on top of the config.
ARCH_OVERRIDES = {
    "drt": ["model.arch=drt"],
    "swa": ["model.arch=swa"],
    "full": ["model.arch=full", "model.use_alibi=False"],
    "landmark": ["model.arch=landmark", "model.impl=xla"],  # plain JAX: it has no Pallas kernel
}


def load(path: str, overrides: list[str]):
  """The config file with overrides applied, and its validated model config."""
  config = config_lib.load_config_file(path)
  for assignment in overrides:
    config_lib.apply_override(config, assignment)
  return config, config_lib.validate(config)


def measure(path: str, overrides: list[str], steps: int, warmup: int, profile_steps: int = 0,
            profile_dir: str = "") -> dict:
  config, model_config = load(path, overrides)
  start = time.perf_counter()
  trainer = train_lib.Trainer(config, model_config, train_lib.make_mesh(config.mesh))
  state = trainer.init_state(config.seed)
  # Printed because a device command has a time limit: the steps are not all a run costs.
  print(f"  initialised in {time.perf_counter() - start:.0f} s", flush=True)
  rng = np.random.default_rng(0)
  shape = (config.train.global_batch_size // jax.process_count(), config.data.seq_len)
  batches = [trainer.global_batch({"inputs": rng.integers(0, min(model_config.vocab_size, 50257),
                                                          shape, dtype=np.int32)})
             for _ in range(2)]
  start = time.perf_counter()
  step = trainer.compile_train_step(state, batches[0])
  compile_s = time.perf_counter() - start
  print(f"  compiled in {compile_s:.0f} s", flush=True)
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = step(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  profile = None
  if profile_steps:
    name = f"{os.path.splitext(os.path.basename(path))[0]}_{model_config.arch}"
    folder = os.path.join(profile_dir, name)
    os.makedirs(folder, exist_ok=True)
    hlo = os.path.join(folder, "step.hlo.txt")
    with open(hlo, "w") as f:
      f.write(step.as_text())
    with jax.profiler.trace(folder):
      for i in range(profile_steps):
        state, metrics = step(state, batches[i % 2])
      jax.block_until_ready((state, metrics))
    profile = trace_top_ops.summarize(trace_top_ops.find_trace(folder), hlo, profile_steps)
    print(f"--- profile of {path} {' '.join(overrides)}")
    trace_top_ops.print_summary(profile)
    profile["top_ops"] = profile["top_ops"][:60]
  tokens = config.train.global_batch_size * config.data.seq_len
  flops = config_lib.flops_per_token(model_config, config.data.seq_len) * tokens
  leaves = jax.tree_util.tree_leaves_with_path(state.params)
  params = sum(leaf.size for _, leaf in leaves)
  embedding = sum(leaf.size for p, leaf in leaves if "embed" in jax.tree_util.keystr(p)
                  and "embedding" in jax.tree_util.keystr(p))
  flops_6n = flops_per_token_6n(model_config, config.data.seq_len, params - embedding) * tokens
  peak = hardware.peak_flops()
  memory = step.memory_analysis()
  return {
      "config": path, "overrides": overrides, "arch": model_config.arch, "impl": model_config.impl,
      "global_batch_size": config.train.global_batch_size, "seq_len": config.data.seq_len,
      "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
      "compile_s": compile_s, "step_s_median": step_s, "step_s_all": times,
      "tokens_per_s": tokens / step_s, "model_tflops_per_step": flops / 1e12,
      "mfu": None if peak is None else flops / step_s / (peak * jax.device_count()),
      "params": params, "non_embedding_params": params - embedding,
      "tflops_6n_per_step": flops_6n / 1e12,
      "mfu_6n": None if peak is None else flops_6n / step_s / (peak * jax.device_count()),
      "final_loss": float(metrics["loss"]),
      "temp_memory_gib": None if memory is None else memory.temp_size_in_bytes / 2**30,
      "profile": profile,
  }


def write_report(out: str, results: list[dict], with_ratios: bool):
  """The results JSON; with_ratios: the last result is the baseline every ratio is taken against."""
  if with_ratios:
    base = results[-1]["step_s_median"]
    for result in results:
      result["step_time_ratio_to_baseline"] = result["step_s_median"] / base
  report = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "results": results}
  with open(out, "w") as f:
    json.dump(report, f, indent=2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", action="append", required=True, help="config file (repeatable)")
  parser.add_argument("--baseline", help="config file every ratio is taken against")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override applied to every config (repeatable)")
  parser.add_argument("--archs", default="", help="comma-separated architectures to measure "
                      "each config as (" + ", ".join(ARCH_OVERRIDES) + "); default: as configured")
  parser.add_argument("--full_seq_len", type=int, default=0,
                      help="data.seq_len of the full-attention measurement (0: the config's)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--profile_steps", type=int, default=0,
                      help="trace this many more steps of each config (0 = no profile)")
  parser.add_argument("--profile_dir", default="",
                      help="where traces go; default: the --out file's folder")
  parser.add_argument("--no_command_buffers", action="store_true",
                      help="XLA launches each kernel on its own instead of as CUDA graphs, so a "
                      "profile names every kernel's scope (step times then include the launches)")
  parser.add_argument("--out", required=True, help="JSON file for the results")
  args = parser.parse_args()
  if args.no_command_buffers:  # read when the first backend starts, which nothing did yet
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_gpu_enable_command_buffer="]).strip()

  archs = [a.strip() for a in args.archs.split(",") if a.strip()]
  for arch in archs:
    if arch not in ARCH_OVERRIDES:
      parser.error(f"--archs: {arch!r} is not one of {', '.join(ARCH_OVERRIDES)}")
  variants = [ARCH_OVERRIDES[arch] + ([f"data.seq_len={args.full_seq_len}"]
                                      if arch == "full" and args.full_seq_len else [])
              for arch in archs] or [[]]
  runs = [(path, args.set + extra) for path in args.config for extra in variants]
  if args.baseline:
    runs.append((args.baseline, args.set))
  try:
    for path, overrides in runs:  # every config checked before anything is compiled
      load(path, overrides)
    profile_dir = args.profile_dir or os.path.dirname(os.path.abspath(args.out))
    begin = time.perf_counter()
    results = []
    for path, overrides in runs:
      print(f"measuring {path} {' '.join(overrides)}", flush=True)
      results.append(measure(path, overrides, args.steps, args.warmup, args.profile_steps,
                             profile_dir))
      r = results[-1]
      # One line and a rewritten JSON per config, so a run cut short keeps what it measured.
      print(f"measured {path} {' '.join(overrides)}: {r['step_s_median'] * 1e3:.1f} ms/step, "
            f"compile {r['compile_s']:.0f} s, {time.perf_counter() - begin:.0f} s since start",
            flush=True)
      write_report(args.out, results, args.baseline is not None and len(results) == len(runs))
  except config_lib.ConfigError as error:
    raise SystemExit(f"error: {error}") from None
  print(f"{'config':28} {'arch':8} {'seq_len':>8} {'impl':6} {'batch':>5} {'step ms':>9} "
        f"{'tokens/s':>11} {'MFU':>6} {'MFU 6N':>6} {'ratio':>6}")
  for r in results:
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    mfu_6n = "-" if r["mfu_6n"] is None else f"{r['mfu_6n']:.1%}"
    ratio = f"{r.get('step_time_ratio_to_baseline', float('nan')):.2f}"
    print(f"{os.path.basename(r['config']):28} {r['arch']:8} {r['seq_len']:8} {r['impl']:6} "
          f"{r['global_batch_size']:5} "
          f"{r['step_s_median'] * 1e3:9.1f} {r['tokens_per_s']:11.0f} {mfu:>6} {mfu_6n:>6} "
          f"{ratio:>6}")


if __name__ == "__main__":
  main()
