"""Train the same config with two model.impl values from the same init on the same batches and
compare the per-step losses (issue 17: "20 training steps of the paper config match the Triton
path's losses"; earlier, issue 3: the kernels against XLA).

  python bench/impl_parity.py --config configs/drt_pg19.py --impls triton,mosaic --steps 20 \
      --set data.source=pydoc --set data.eval_path= --set data.tokenizer=byte \
      --set model.vocab_size=259 \
      --set train.global_batch_size=4 --out FILE.json

The first impl is the baseline: differences are the second's losses minus the first's. An op the
second impl cannot run falls back (attention_impls.py) and says so in the log.
"""

import argparse
import json
import sys
import time

import jax
import numpy as np

from drt_jax import config as config_lib
from drt_jax import train_lib
from drt_jax.data import pipeline


def loss_curve(config, steps: int) -> tuple[list[float], float]:
  """Per-step training losses and the median step time (s) after the first step."""
  trainer = train_lib.Trainer(config, config_lib.validate(config), train_lib.make_mesh(config.mesh))
  state = trainer.init_state(config.seed)
  batches = pipeline.make_train_iterator(config)
  step = None
  losses, times = [], []
  for _ in range(steps):
    batch = trainer.global_batch(next(batches))
    step = step or trainer.compile_train_step(state, batch)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    times.append(time.perf_counter() - start)
    print(f"{config.model.impl} step {len(losses)}: loss {losses[-1]:.4f}", flush=True)
  return losses, float(np.median(times[1:])) if steps > 1 else float("nan")


def impl_pair(value: str) -> tuple[str, str]:
  impls = tuple(name.strip() for name in value.split(","))
  if len(impls) != 2 or len(set(impls)) != 2 or not set(impls) <= set(config_lib.IMPLS):
    raise argparse.ArgumentTypeError(f"--impls={value!r}: two different impls of "
                                     + ", ".join(config_lib.IMPLS))
  return impls


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--impls", type=impl_pair, default=("xla", "triton"),
                      help="BASELINE,OTHER: two of " + ", ".join(config_lib.IMPLS))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  curves = {}
  for impl in args.impls:
    config = config_lib.load_config_file(args.config)
    for assignment in args.set + [f"model.impl={impl}"]:
      config_lib.apply_override(config, assignment)
    curves[impl] = loss_curve(config, args.steps)
  base, other = args.impls
  a, b = np.array(curves[base][0]), np.array(curves[other][0])
  report = {
      "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
      "device_kind": jax.devices()[0].device_kind, "impls": list(args.impls),
      "losses": {impl: curves[impl][0] for impl in args.impls},
      "step_s": {impl: curves[impl][1] for impl in args.impls},
      "max_abs_diff": float(np.abs(b - a).max()),
      "max_rel_diff": float((np.abs(b - a) / np.abs(a)).max()),
  }
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(f"step {base + ' loss':>12} {other + ' loss':>12} {'diff':>10}")
  for i, (x, y) in enumerate(zip(a, b)):
    print(f"{i + 1:4d} {x:12.4f} {y:12.4f} {y - x:10.2e}")
  print(f"max |diff| {report['max_abs_diff']:.2e} (rel {report['max_rel_diff']:.2e}); step "
        + ", ".join(f"{impl} {report['step_s'][impl] * 1e3:.0f} ms" for impl in args.impls))


if __name__ == "__main__":
  main()
