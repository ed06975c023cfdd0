"""Per-token decode latency and peak device memory against context length (issue 5).

For each context length and chunk memory ("device", "host"), in a fresh process (so the device's
peak-memory counter is that configuration's alone): prefill `context` random tokens segment by
segment (the time includes compiling), then time `--steps` greedy decoding steps (sample, then
step, each waited for as a chat loop would; every chunk_len-th step also encodes a chunk and
retrieves: it scores every earlier chunk's landmark key, `--key_block` chunks per block, each
block sent from host memory with chunk memory "host"; a prefill segment copies the chunks it
retrieved `--gather_block` at a time). Params are the config's initialisation:
latency and memory do not depend on their values. Prints a table; writes JSON.

Peak device memory is the allocator's `peak_bytes_in_use`, so it depends on the allocator
(`--allocator`, XLA_PYTHON_CLIENT_ALLOCATOR of each row's process). JAX's default BFC allocator
counts the whole free chunk it hands out, and does not split a chunk smaller than twice the
request: its peak includes padding that depends on the order of earlier allocations, so the same
program's peak differs by a few percent between runs of different lengths. "cuda_async"
(cudaMallocAsync) counts the bytes requested: the peak of the program's own buffers.

  python3 bench/decode.py --config configs/drt_pg19.py --out $OUT/decode.json \
      [--contexts 65536,1048576,4194304,16777216] [--memories device,host] [--steps 512] \
      [--key_block 8192] [--gather_block 256] [--allocator cuda_async] [--set model.impl=xla ...]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ALLOCATORS = ("default", "cuda_async")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def measure(config_path: str, overrides, context: int, memory: str, steps: int,
            segment_len: int, seed: int, **transfers) -> dict:
  """One configuration, in this process."""
  import flax.linen as nn
  import jax

  from drt_jax import config as config_lib
  from drt_jax import generate as generate_lib
  from drt_jax import inference
  from drt_jax.model import lm

  config = config_lib.load_config_file(config_path)
  for assignment in overrides:
    config_lib.apply_override(config, assignment)
  model_config = config_lib.validate(config)
  params = nn.meta.unbox(lm.init_params(lm.make_model(model_config), jax.random.key(seed), 1,
                                        model_config.chunk_len))
  decoder = inference.Decoder(model_config, params, max_len=context + steps,
                              segment_len=segment_len, **transfers)
  session = decoder.start(1, memory)
  tokens = np.random.default_rng(seed).integers(0, model_config.vocab_size, (1, context))
  start = time.perf_counter()
  hidden = session.prefill(tokens)
  hidden.block_until_ready()
  prefill_s = time.perf_counter() - start
  after_prefill = _device_gib("bytes_in_use")
  times = []
  for i in range(steps):
    start = time.perf_counter()
    token = generate_lib.sample(decoder.logits(hidden), jax.random.key(i), temperature=0.0,
                                top_k=0)
    hidden = session.step(token)
    hidden.block_until_ready()
    times.append(time.perf_counter() - start)
  times = np.asarray(times[model_config.chunk_len:])  # the first chunk's steps include compiles
  boundary = np.arange(model_config.chunk_len, steps)[:len(times)]
  closes = (context + boundary + 1) % model_config.chunk_len == 0
  return {
      "context": context, "chunk_memory": memory, "prefill_s": prefill_s,
      "prefill_tokens_per_s": context / prefill_s,
      "step_ms_mean": 1e3 * float(times.mean()), "step_ms_p50": 1e3 * float(np.median(times)),
      "step_ms_p99": 1e3 * float(np.quantile(times, 0.99)),
      "plain_step_ms_median": 1e3 * float(np.median(times[~closes])),
      "landmark_step_ms_median": 1e3 * float(np.median(times[closes])) if closes.any() else None,
      "peak_device_gib": _device_gib("peak_bytes_in_use"),
      "peak_device_bytes": _device_bytes("peak_bytes_in_use"),
      # Live device memory once the context is in (model, caches, state) and after decoding.
      "in_use_after_prefill_gib": after_prefill,
      "in_use_after_decode_gib": _device_gib("bytes_in_use"),
      **transfers,
      "allocator": os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default"),
      "device": jax.devices()[0].device_kind, "config": config_path, "overrides": overrides,
  }


def _device_bytes(stat: str):
  """One of the device allocator's counters (None where the backend has none)."""
  import jax
  return (jax.devices()[0].memory_stats() or {}).get(stat)


def _device_gib(stat: str):
  return (_device_bytes(stat) or 0) / 2**30 or None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/drt_pg19.py")
  parser.add_argument("--set", action="append", default=[], help="override, e.g. "
                      "model.impl=xla (repeatable)")
  parser.add_argument("--contexts", default="65536,1048576,4194304,16777216")
  parser.add_argument("--memories", default="device,host")
  parser.add_argument("--steps", type=int, default=512)
  parser.add_argument("--segment_len", type=int, default=65520, help="prefill segment, a "
                      "multiple of model.chunk_len")
  parser.add_argument("--key_block", type=int, default=8192, help="landmark keys scored per "
                      "block at a retrieval, in chunks")
  parser.add_argument("--gather_block", type=int, default=256, help="retrieved chunks' K/V "
                      "copied to the device per piece in a prefill segment")
  parser.add_argument("--allocator", default="default", choices=ALLOCATORS,
                      help="XLA_PYTHON_CLIENT_ALLOCATOR of the measuring processes")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", required=True)
  parser.add_argument("--single", help=argparse.SUPPRESS)  # context,memory: measure in-process
  args = parser.parse_args()
  if args.single:
    context, memory = args.single.split(",")
    print(json.dumps(measure(args.config, args.set, int(context), memory, args.steps,
                             args.segment_len, args.seed, key_block=args.key_block,
                             gather_block=args.gather_block)))
    return
  rows = []
  for memory in args.memories.split(","):
    for context in map(int, args.contexts.split(",")):
      command = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--steps",
                 str(args.steps), "--segment_len", str(args.segment_len), "--key_block",
                 str(args.key_block), "--gather_block", str(args.gather_block), "--seed",
                 str(args.seed), "--out", args.out, "--single", f"{context},{memory}"]
      command += [f"--set={assignment}" for assignment in args.set]
      result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              env=dict(os.environ, XLA_PYTHON_CLIENT_ALLOCATOR=args.allocator))
      if result.returncode:
        row = {"context": context, "chunk_memory": memory,
               "error": (result.stderr.strip().splitlines() or ["?"])[-1]}
      else:
        row = json.loads(result.stdout.strip().splitlines()[-1])
      rows.append(row)
      print(_format(row), flush=True)
  for memory in args.memories.split(","):
    mine = [r for r in rows if r["chunk_memory"] == memory and "error" not in r]
    if len(mine) > 1:
      print(f"{memory}: step latency at {mine[-1]['context']} / at {mine[0]['context']} = "
            f"{mine[-1]['step_ms_mean'] / mine[0]['step_ms_mean']:.2f}x")
      if mine[0]["peak_device_bytes"]:
        print(f"{memory}: peak device memory at {mine[-1]['context']} - at {mine[0]['context']} = "
              f"{mine[-1]['peak_device_bytes'] - mine[0]['peak_device_bytes']:+,d} bytes")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": rows}, f,
              indent=1)


def _format(row: dict) -> str:
  if "error" in row:
    return f"{row['context']:>9} {row['chunk_memory']:>6}  error: {row['error']}"
  landmark = row["landmark_step_ms_median"]
  peak = row["peak_device_gib"]
  return (f"{row['context']:>9} {row['chunk_memory']:>6} {row['allocator']:>10}  prefill "
          f"{row['prefill_s']:7.1f} s "
          f"({row['prefill_tokens_per_s']:9.0f} tok/s)  step mean "
          f"{row['step_ms_mean']:6.2f} "
          f"p50 {row['step_ms_p50']:6.2f} p99 {row['step_ms_p99']:6.2f} ms  plain "
          f"{row['plain_step_ms_median']:6.2f} landmark "
          f"{'-' if landmark is None else f'{landmark:6.2f}'} ms  peak device "
          f"{'-' if peak is None else f'{peak:6.3f} GiB'}  in use after prefill / decode "
          f"{row['in_use_after_prefill_gib'] or 0:.3f} / "
          f"{row['in_use_after_decode_gib'] or 0:.3f} GiB")


if __name__ == "__main__":
  main()
