"""Per-token decode latency and peak device memory against context length (issue 5).

Each measurement prefills `context` random tokens segment by segment (the time includes
compiling), then times greedy decoding steps (sample, then step, each waited for as a chat loop
would; every chunk_len-th step also encodes a chunk and retrieves: it scores every earlier chunk's
landmark key, `--key_block` chunks per block, each block sent from host memory with chunk memory
"host"; a prefill segment copies the chunks it retrieved `--gather_block` at a time). Params are
the config's initialisation: latency and memory do not depend on their values. The first
chunk_len steps of a sequence are not timed (they compile). Prints a table; writes JSON.

--mode separate (memory): each context length and chunk memory ("device", "host") in a fresh
  process, so the device's peak-memory counter is that configuration's alone; `--steps` steps.
--mode interleaved (latency): one fresh process per chunk memory prefills every context, then
  times `--rounds` rounds of `--steps` steps of each context in turn. A step's latency varies by
  ~20% from one process to the next (3.0 to 4.5 ms for the same plain step on the H100), more than
  the effect of the context, so latency ratios are taken between contexts measured in one process,
  as the median over rounds of each round's mean step.

Peak device memory is the allocator's `peak_bytes_in_use`, so it depends on the allocator
(`--allocator`, XLA_PYTHON_CLIENT_ALLOCATOR of the measuring processes). JAX's default BFC
allocator counts the whole free chunk it hands out, and does not split a chunk smaller than twice
the request: its peak includes padding that depends on the order of earlier allocations, so the
same program's peak differs by a few percent between runs of different lengths. "cuda_async"
(cudaMallocAsync) counts the bytes requested: the peak of the program's own buffers.

  python3 bench/decode.py --config configs/drt_pg19.py --out $OUT/decode.json \
      [--mode separate|interleaved] [--contexts 65536,1048576,4194304,16777216] \
      [--memories device,host] [--steps 512] [--rounds 5] [--key_block 8192] \
      [--gather_block 256] [--allocator cuda_async] [--set model.impl=xla ...]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ALLOCATORS = ("default", "cuda_async")
MODES = ("separate", "interleaved")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Bench:
  """A model with the config's initial params, and its decoders' measurements, in this process."""

  def __init__(self, config_path: str, overrides, seed: int, segment_len: int, **transfers):
    import flax.linen as nn
    import jax

    from drt_jax import config as config_lib
    from drt_jax.model import lm

    config = config_lib.load_config_file(config_path)
    for assignment in overrides:
      config_lib.apply_override(config, assignment)
    self.config = config_lib.validate(config)
    self.params = nn.meta.unbox(lm.init_params(lm.make_model(self.config), jax.random.key(seed),
                                               1, self.config.chunk_len))
    self.seed, self.segment_len, self.transfers = seed, segment_len, transfers
    self.about = {**transfers, "allocator": os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR",
                                                           "default"),
                  "device": jax.devices()[0].device_kind, "config": config_path,
                  "overrides": overrides}

  def prefilled(self, context: int, memory: str, steps: int):
    """A session of one sequence holding `context` tokens, room for `steps` more, and the
    chunk_len untimed steps done -> (session, hidden [1, d], prefill seconds)."""
    from drt_jax import inference

    decoder = inference.DRTDecoder(self.config, self.params,
                                max_len=context + self.config.chunk_len + steps,
                                segment_len=self.segment_len, **self.transfers)
    session = decoder.start(1, memory)
    tokens = np.random.default_rng(self.seed).integers(0, self.config.vocab_size, (1, context))
    start = time.perf_counter()
    hidden = session.prefill(tokens)
    hidden.block_until_ready()
    prefill_s = time.perf_counter() - start
    hidden, _, _ = self.steps(session, hidden, self.config.chunk_len)
    return session, hidden, prefill_s

  def steps(self, session, hidden, n: int):
    """n greedy steps -> (hidden, seconds per step, bool per step: it closed a chunk)."""
    import jax

    from drt_jax import generate as generate_lib

    times, closes = [], []
    for _ in range(n):
      closes.append((int(session.lengths[0]) + 1) % self.config.chunk_len == 0)
      start = time.perf_counter()
      token = generate_lib.sample(session.decoder.logits(hidden), jax.random.key(0),
                                  temperature=0.0, top_k=0)
      hidden = session.step(token)
      hidden.block_until_ready()
      times.append(time.perf_counter() - start)
    return hidden, np.asarray(times), np.asarray(closes)


def latency(times, closes) -> dict:
  """Step times (seconds) -> summary in ms; landmark steps are those that closed a chunk."""
  return {
      "step_ms_mean": 1e3 * float(times.mean()), "step_ms_p50": 1e3 * float(np.median(times)),
      "step_ms_p99": 1e3 * float(np.quantile(times, 0.99)),
      "plain_step_ms_median": 1e3 * float(np.median(times[~closes])),
      "landmark_step_ms_median": 1e3 * float(np.median(times[closes])) if closes.any() else None,
  }


def measure_separate(bench: Bench, context: int, memory: str, steps: int) -> list[dict]:
  """One context: prefill time, latency, peak and live device memory."""
  session, hidden, prefill_s = bench.prefilled(context, memory, steps)
  after_prefill = _device_gib("bytes_in_use")
  _, times, closes = bench.steps(session, hidden, steps)
  return [{
      "context": context, "chunk_memory": memory, "prefill_s": prefill_s,
      "prefill_tokens_per_s": context / prefill_s, **latency(times, closes),
      "peak_device_gib": _device_gib("peak_bytes_in_use"),
      "peak_device_bytes": _device_bytes("peak_bytes_in_use"),
      # Live device memory once the context is in (model, caches, state) and after decoding.
      "in_use_after_prefill_gib": after_prefill,
      "in_use_after_decode_gib": _device_gib("bytes_in_use"), **bench.about,
  }]


def measure_interleaved(bench: Bench, contexts, memory: str, steps: int,
                        rounds: int) -> list[dict]:
  """Every context prefilled in this process, then rounds of `steps` steps of each in turn."""
  sessions = [bench.prefilled(context, memory, steps * rounds) for context in contexts]
  hidden = [h for _, h, _ in sessions]
  times = [[] for _ in contexts]
  closes = [[] for _ in contexts]
  for _ in range(rounds):
    for i, (session, _, _) in enumerate(sessions):
      hidden[i], t, c = bench.steps(session, hidden[i], steps)
      times[i].append(t)
      closes[i].append(c)
  rows = []
  for context, (_, _, prefill_s), t, c in zip(contexts, sessions, times, closes):
    rows.append({
        "context": context, "chunk_memory": memory, "prefill_s": prefill_s,
        "prefill_tokens_per_s": context / prefill_s,
        "round_step_ms_means": [1e3 * float(x.mean()) for x in t],
        "step_ms_mean_median": 1e3 * float(np.median([x.mean() for x in t])),
        **latency(np.concatenate(t), np.concatenate(c)), **bench.about,
    })
  return rows


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
  parser.add_argument("--mode", default="separate", choices=MODES)
  parser.add_argument("--contexts", default="65536,1048576,4194304,16777216")
  parser.add_argument("--memories", default="device,host")
  parser.add_argument("--steps", type=int, default=512, help="timed steps (per round)")
  parser.add_argument("--rounds", type=int, default=5, help="rounds, in --mode interleaved")
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
  parser.add_argument("--single", help=argparse.SUPPRESS)  # contexts;memory: measure in-process
  args = parser.parse_args()
  if args.single:
    contexts, memory = args.single.split(";")
    contexts = [int(c) for c in contexts.split(",")]
    bench = Bench(args.config, args.set, args.seed, args.segment_len,
                  key_block=args.key_block, gather_block=args.gather_block)
    if args.mode == "separate":
      rows = measure_separate(bench, contexts[0], memory, args.steps)
    else:
      rows = measure_interleaved(bench, contexts, memory, args.steps, args.rounds)
    print(json.dumps(rows))
    return
  rows = []
  contexts = args.contexts.split(",")
  for memory in args.memories.split(","):
    runs = [[c] for c in contexts] if args.mode == "separate" else [contexts]
    for run in runs:
      command = [sys.executable, os.path.abspath(__file__), f"--single={','.join(run)};{memory}"]
      command += [f"--{name}={getattr(args, name)}" for name in (
          "config", "mode", "steps", "rounds", "segment_len", "key_block", "gather_block",
          "seed", "out")]
      command += [f"--set={assignment}" for assignment in args.set]
      result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              env=dict(os.environ, XLA_PYTHON_CLIENT_ALLOCATOR=args.allocator))
      if result.returncode:
        error = (result.stderr.strip().splitlines() or ["?"])[-1]
        new = [{"context": int(c), "chunk_memory": memory, "error": error} for c in run]
      else:
        new = json.loads(result.stdout.strip().splitlines()[-1])
      for row in new:
        print(_format(row), flush=True)
      rows += new
  _print_ratios(rows, args.memories.split(","))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
               "mode": args.mode, "rows": rows}, f, indent=1)


def _print_ratios(rows, memories):
  """Last context against the first, per chunk memory."""
  for memory in memories:
    mine = [r for r in rows if r["chunk_memory"] == memory and "error" not in r]
    if len(mine) < 2:
      continue
    first, last = mine[0], mine[-1]
    key = "step_ms_mean_median" if "step_ms_mean_median" in first else "step_ms_mean"
    print(f"{memory}: step latency ({key}) at {last['context']} / at {first['context']} = "
          f"{last[key] / first[key]:.2f}x")
    if first.get("peak_device_bytes"):
      print(f"{memory}: peak device memory at {last['context']} - at {first['context']} = "
            f"{last['peak_device_bytes'] - first['peak_device_bytes']:+,d} bytes")


def _format(row: dict) -> str:
  if "error" in row:
    return f"{row['context']:>9} {row['chunk_memory']:>6}  error: {row['error']}"
  landmark = row["landmark_step_ms_median"]
  text = (f"{row['context']:>9} {row['chunk_memory']:>6} {row['allocator']:>10}  prefill "
          f"{row['prefill_s']:7.1f} s ({row['prefill_tokens_per_s']:9.0f} tok/s)  step mean "
          f"{row['step_ms_mean']:6.2f} p50 {row['step_ms_p50']:6.2f} p99 "
          f"{row['step_ms_p99']:6.2f} ms  plain {row['plain_step_ms_median']:6.2f} landmark "
          f"{'-' if landmark is None else f'{landmark:6.2f}'} ms")
  if "step_ms_mean_median" in row:
    return text + (f"  median of round means {row['step_ms_mean_median']:6.2f} ms (rounds "
                   f"{' '.join(f'{x:.2f}' for x in row['round_step_ms_means'])})")
  peak = row["peak_device_gib"]
  return text + (f"  peak device {'-' if peak is None else f'{peak:6.3f} GiB'}  in use after "
                 f"prefill / decode {row['in_use_after_prefill_gib'] or 0:.3f} / "
                 f"{row['in_use_after_decode_gib'] or 0:.3f} GiB")


if __name__ == "__main__":
  main()
