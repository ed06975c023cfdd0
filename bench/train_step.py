"""Compiled train-step time, tokens/s and MFU of one or more configs, measured in one run.

  python bench/train_step.py --config configs/drt_pg19.py --baseline configs/swa_pg19.py \
      --set train.global_batch_size=4 --set data.source=pydoc --out FILE.json
  python bench/train_step.py --config configs/drt_pg19.py --archs drt,swa,full,landmark \
      --full_seq_len 8192 --out FILE.json

--archs measures each config as every architecture named (model.arch set, plus what the
architecture needs: model.use_alibi=False for full, model.impl=xla for landmark); --full_seq_len
gives full attention its own data.seq_len (its [T, T] attention may not fit at the others' length).
Batches are random token ids (no input pipeline in the timing); each step is timed to completion
and the median over --steps steps after --warmup steps is reported. With --baseline, every
config's step time is also given as a ratio to the baseline's.
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


def measure(path: str, overrides: list[str], steps: int, warmup: int) -> dict:
  config, model_config = load(path, overrides)
  trainer = train_lib.Trainer(config, model_config, train_lib.make_mesh(config.mesh))
  state = trainer.init_state(config.seed)
  rng = np.random.default_rng(0)
  shape = (config.train.global_batch_size // jax.process_count(), config.data.seq_len)
  batches = [trainer.global_batch({"inputs": rng.integers(0, min(model_config.vocab_size, 50257),
                                                          shape, dtype=np.int32)})
             for _ in range(2)]
  start = time.perf_counter()
  step = trainer.compile_train_step(state, batches[0])
  compile_s = time.perf_counter() - start
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = step(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tokens = config.train.global_batch_size * config.data.seq_len
  flops = config_lib.flops_per_token(model_config, config.data.seq_len) * tokens
  peak = hardware.peak_flops()
  memory = step.memory_analysis()
  return {
      "config": path, "overrides": overrides, "arch": model_config.arch, "impl": model_config.impl,
      "global_batch_size": config.train.global_batch_size, "seq_len": config.data.seq_len,
      "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
      "compile_s": compile_s, "step_s_median": step_s, "step_s_all": times,
      "tokens_per_s": tokens / step_s, "model_tflops_per_step": flops / 1e12,
      "mfu": None if peak is None else flops / step_s / (peak * jax.device_count()),
      "final_loss": float(metrics["loss"]),
      "temp_memory_gib": None if memory is None else memory.temp_size_in_bytes / 2**30,
  }


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
  parser.add_argument("--out", required=True, help="JSON file for the results")
  args = parser.parse_args()

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
    results = [measure(path, overrides, args.steps, args.warmup) for path, overrides in runs]
  except config_lib.ConfigError as error:
    raise SystemExit(f"error: {error}") from None
  if args.baseline:
    base = results[-1]["step_s_median"]
    for result in results:
      result["step_time_ratio_to_baseline"] = result["step_s_median"] / base
  report = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "results": results}
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(f"{'config':28} {'arch':8} {'seq_len':>8} {'impl':6} {'step ms':>9} {'tokens/s':>11} "
        f"{'MFU':>6} {'ratio':>6}")
  for r in results:
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    ratio = f"{r.get('step_time_ratio_to_baseline', float('nan')):.2f}"
    print(f"{os.path.basename(r['config']):28} {r['arch']:8} {r['seq_len']:8} {r['impl']:6} "
          f"{r['step_s_median'] * 1e3:9.1f} "
          f"{r['tokens_per_s']:11.0f} {mfu:>6} {ratio:>6}")


if __name__ == "__main__":
  main()
