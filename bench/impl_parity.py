"""Train the same config with model.impl="xla" and "pallas" from the same init on the same batches
and compare the loss curves (issue: FlashGCA / sliding-window kernels wired into the model).

  python bench/impl_parity.py --config configs/drt_pg19.py --steps 20 \
      --set data.source=pydoc --set data.tokenizer=byte --set model.vocab_size=259 \
      --set train.global_batch_size=4 --out FILE.json
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
  return losses, float(np.median(times[1:]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  curves = {}
  for impl in ("xla", "pallas"):
    config = config_lib.load_config_file(args.config)
    for assignment in args.set + [f"model.impl={impl}"]:
      config_lib.apply_override(config, assignment)
    curves[impl] = loss_curve(config, args.steps)
  xla, pallas = np.array(curves["xla"][0]), np.array(curves["pallas"][0])
  report = {
      "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
      "device_kind": jax.devices()[0].device_kind,
      "xla_losses": xla.tolist(), "pallas_losses": pallas.tolist(),
      "max_abs_diff": float(np.abs(xla - pallas).max()),
      "max_rel_diff": float((np.abs(xla - pallas) / np.abs(xla)).max()),
      "xla_step_s": curves["xla"][1], "pallas_step_s": curves["pallas"][1],
  }
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print("step   xla loss   pallas loss")
  for i, (a, b) in enumerate(zip(xla, pallas)):
    print(f"{i + 1:4d} {a:10.4f} {b:13.4f}")
  print(f"max |diff| {report['max_abs_diff']:.4f} (rel {report['max_rel_diff']:.2e}); step "
        f"xla {report['xla_step_s'] * 1e3:.0f} ms, pallas {report['pallas_step_s'] * 1e3:.0f} ms")


if __name__ == "__main__":
  main()
