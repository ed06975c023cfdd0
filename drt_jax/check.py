"""First-run check of an install: `python -m drt_jax.check [--platform gpu]`.

Prints the versions, JAX's platform and devices, the attention kernels model.impl="auto" picks
there (model/attention_impls.py), then compiles and runs one training step of a tiny DRT (random
tokens, no data) on them, so that a silent fallback to the CPU shows before a real run. With
--platform, exits with a one-line error unless JAX runs on that platform.
"""

import argparse
import sys
import time

import jax
import numpy as np

from configs import tiny
from drt_jax import config as config_lib
from drt_jax import train_lib
from drt_jax.model import attention_impls

PLATFORMS = ("cpu", "gpu", "tpu")


def tiny_step() -> tuple[float, float, int]:
  """(loss, seconds, vocabulary size) of one compiled training step of a 2-layer DRT over all
  devices."""
  config = tiny.get_config()
  model = config.model
  model.d_model, model.num_heads, model.num_kv_heads, model.mlp_dim = 64, 2, 2, 128
  model.decoder_layers, model.chunk_len, model.window, model.topk = (1, 1), 15, 32, 2
  config.data.seq_len = 15 * 8
  config.train.global_batch_size = 2 * jax.device_count()
  trainer = train_lib.Trainer(config, config_lib.validate(config),
                              train_lib.make_mesh(config.mesh))
  state = trainer.init_state(config.seed)
  tokens = np.random.default_rng(0).integers(0, 257, (config.train.global_batch_size //
                                                      jax.process_count(), 120), np.int32)
  batch = trainer.global_batch({"inputs": tokens})
  start = time.perf_counter()
  state, metrics = trainer.compile_train_step(state, batch)(state, batch)
  loss = float(metrics["loss"])
  return loss, time.perf_counter() - start, model.vocab_size


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--platform", choices=PLATFORMS,
                      help="fail unless JAX's default platform is this one")
  args = parser.parse_args(argv)
  import jaxlib

  print(f"python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}")
  platform = jax.default_backend()
  devices = jax.devices()
  print(f"platform {platform}: {len(devices)} devices ({devices[0].device_kind}), "
        f"process {jax.process_index()} of {jax.process_count()}")
  if args.platform is not None and platform != args.platform:
    hint = ""
    if args.platform == "gpu":
      hint = (" (a CPU-only jaxlib: pip install -e '.[cuda]' -c requirements.txt, or check that "
              "the machine's CUDA jax is the one this Python imports)")
    print(f"error: JAX runs on {platform}, not {args.platform}{hint}", file=sys.stderr)
    return 1
  order = attention_impls.implementation_order(*attention_impls.local_device(), "auto")
  print("model.impl='auto' here: " + " -> ".join(order))
  loss, seconds, vocab = tiny_step()
  if not np.isfinite(loss):
    print(f"error: the tiny training step gave loss {loss}", file=sys.stderr)
    return 1
  print(f"one training step of a tiny DRT: loss {loss:.3f} (about ln {vocab} = "
        f"{np.log(vocab):.2f} at init), {seconds:.1f} s with compilation; ok")
  return 0


if __name__ == "__main__":
  sys.exit(main())
