"""Lowering and compile time of a config's train step, its HLO size and memory analysis, on this
backend, without running it (the state and batch are abstract, so nothing is allocated).

  python bench/compile_step.py --config configs/landmark_pg19.py --set train.global_batch_size=4 \
      --set data.source=pydoc --set model.vocab_size=50265 [--set data.seq_len=4032] [--run 2]

--run N also runs N steps on random tokens after one warm-up step (small shapes: it allocates the
state) and reports the median step time. One line of key=value per measurement, for grepping.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from drt_jax import config as config_lib  # noqa: E402
from drt_jax import train_lib  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--run", type=int, default=0, help="steps to run after compiling (0: none)")
  args = parser.parse_args()
  config = config_lib.load_config_file(args.config)
  for assignment in args.set:
    config_lib.apply_override(config, assignment)
  model_config = config_lib.validate(config)
  trainer = train_lib.Trainer(config, model_config, train_lib.make_mesh(config.mesh))
  shape = (config.train.global_batch_size, config.data.seq_len)
  batch = {"inputs": jax.ShapeDtypeStruct(shape, np.int32, sharding=trainer.batch_sharding)}
  start = time.perf_counter()
  lowered = trainer.lower_train_step(trainer.abstract_state, batch)
  lower_s = time.perf_counter() - start
  hlo_chars = len(lowered.as_text())
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  temp = None if memory is None else memory.temp_size_in_bytes / 2**30
  line = (f"arch={model_config.arch} seq_len={config.data.seq_len} "
          f"batch={config.train.global_batch_size} lower_s={lower_s:.1f} "
          f"compile_s={compile_s:.1f} stablehlo_chars={hlo_chars} "
          f"compiled_hlo_chars={len(compiled.as_text())} temp_gib={temp:.2f}")
  if args.run:
    state = trainer.init_state(config.seed)
    rng = np.random.default_rng(0)
    tokens = trainer.global_batch({"inputs": rng.integers(
        0, min(model_config.vocab_size, 50257), shape, dtype=np.int32)})
    times = []
    for i in range(args.run + 1):
      start = time.perf_counter()
      state, metrics = compiled(state, tokens)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
    line += (f" step_s={statistics.median(times[1:]):.3f} "
             f"loss={float(metrics['loss']):.4f}")
  print(line, flush=True)


if __name__ == "__main__":
  main()
