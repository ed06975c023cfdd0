"""Training losses of the first N steps from a fixed init on fixed batches, to show that two
versions of the train step compute the same function.

  python bench/loss_curve.py --config configs/drt_pg19.py --steps 200 --out new.json \
      [--against old.json --plot curves.png]

The batches are windows of the UTF-8 bytes of `pydoc_data.topics` (on every Python install) at
offsets drawn from a fixed seed, so runs of different code see the same data without an input
pipeline; the model keeps the config's vocabulary (bytes are ids < 256). With --against, the
other run's curve is compared step by step (max abs / rel difference) and both are plotted.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pydoc_data.topics  # noqa: E402

from drt_jax import config as config_lib  # noqa: E402
from drt_jax import train_lib  # noqa: E402


def byte_batches(batch: int, length: int, steps: int, seed: int = 0):
  text = np.frombuffer("".join(pydoc_data.topics.topics.values()).encode("utf-8"), np.uint8)
  offsets = np.random.default_rng(seed).integers(0, text.size - length, (steps, batch))
  for row in offsets:
    yield {"inputs": np.stack([text[o:o + length] for o in row]).astype(np.int32)}


def run(path: str, overrides: list[str], steps: int) -> dict:
  config = config_lib.load_config_file(path)
  for assignment in overrides:
    config_lib.apply_override(config, assignment)
  model_config = config_lib.validate(config)
  trainer = train_lib.Trainer(config, model_config, train_lib.make_mesh(config.mesh))
  state = trainer.init_state(config.seed)
  batches = byte_batches(config.train.global_batch_size, config.data.seq_len, steps)
  first = trainer.global_batch(next(byte_batches(config.train.global_batch_size,
                                                 config.data.seq_len, 1)))
  step = trainer.compile_train_step(state, first)
  losses, grad_norms = [], []
  start = time.perf_counter()
  for batch in batches:
    state, metrics = step(state, trainer.global_batch(batch))
    losses.append(metrics["loss"])
    grad_norms.append(metrics["grad_norm"])
  losses = [float(x) for x in losses]
  return {"config": path, "overrides": overrides, "steps": steps, "loss": losses,
          "grad_norm": [float(x) for x in grad_norms],
          "seconds": time.perf_counter() - start, "device_kind": jax.devices()[0].device_kind}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--label", default="", help="name of this run in the JSON and the plot")
  parser.add_argument("--out", required=True, help="JSON file for this run's curve")
  parser.add_argument("--against", help="another run's JSON to compare with")
  parser.add_argument("--plot", help="PNG of both curves (needs --against and matplotlib)")
  args = parser.parse_args()
  result = run(args.config, args.set, args.steps)
  result["label"] = args.label or args.out
  if args.against:
    with open(args.against) as f:
      other = json.load(f)
    a, b = np.array(result["loss"]), np.array(other["loss"][:len(result["loss"])])
    result["against"] = {"label": other.get("label", args.against),
                         "max_abs_diff": float(np.max(np.abs(a - b))),
                         "max_rel_diff": float(np.max(np.abs(a - b) / np.abs(b))),
                         "mean_abs_diff_last_50": float(np.mean(np.abs(a - b)[-50:]))}
    print(f"{result['label']} vs {result['against']['label']}: " + ", ".join(
        f"{k} {v:.3g}" for k, v in result["against"].items() if k != "label"))
    if args.plot:
      import matplotlib
      matplotlib.use("Agg")
      import matplotlib.pyplot as plt
      fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
      steps = np.arange(1, a.size + 1)
      top.plot(steps, b, label=result["against"]["label"])
      top.plot(steps, a, "--", label=result["label"])
      top.set_ylabel("training loss")
      top.legend()
      bottom.plot(steps, a - b)
      bottom.set_ylabel("difference")
      bottom.set_xlabel("step")
      fig.tight_layout()
      fig.savefig(args.plot, dpi=120)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"{result['label']}: loss step 1 {result['loss'][0]:.4f}, step {args.steps} "
        f"{result['loss'][-1]:.4f}, {result['seconds']:.1f} s")


if __name__ == "__main__":
  main()
