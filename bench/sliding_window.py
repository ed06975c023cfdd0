"""Sliding-window attention (W=512, ALiBi) on the GPU: every registered implementation vs cuDNN vs
the plain-JAX reference.

`python3 bench/sliding_window.py --out FILE.json [--sweep]` on the device. One run checks every
implementation of the op (drt_jax/model/attention_impls.py: Triton, Mosaic GPU once registered;
one that cannot run the shape is listed with its reason) with and without ALiBi, cuDNN's window
(no ALiBi) and the reference ("xla") against the float32 reference (highest-precision matmuls) on
fresh random bf16 inputs, then times forward and forward+backward (per-call median over --reps
groups of back-to-back calls, each group synchronised, after warm-up) and prints a table last.
--sweep first times each kernel alone over candidate tile sizes (Triton: tiles, warps and stages;
Mosaic GPU: streamed tile and pipeline depth) and uses the fastest of each kernel for that
implementation's rows; the sweep's rows and choices are in the JSON.

FLOPs count only visible (query, key) pairs: 4 * head_dim per pair forward (QK^T and PV), 2.5x
that backward (5 matmuls, with the QK^T recomputation), so forward+backward = 3.5x forward.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.model import attention_impls
from kernels_pallas import sliding_window as sw
from kernels_pallas import sliding_window_mosaic as sw_mosaic

# Candidate tiles per kernel: (queries, keys, warps, stages); for dK/dV (keys per program, queries).
FWD_CANDIDATES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (128, 64, 4, 3),
                  (128, 64, 8, 3), (64, 128, 4, 3)]
DKV_CANDIDATES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 8, 3),
                  (32, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)]
DQ_CANDIDATES = [(64, 32, 4, 2), (64, 32, 4, 3), (64, 32, 4, 4), (128, 32, 4, 3), (128, 32, 8, 3),
                 (64, 64, 4, 3), (128, 64, 8, 3)]
# Mosaic GPU: (streamed tile, stages) of each kernel; its fixed tiles are 2 x 64 rows.
MOSAIC_CANDIDATES = [(64, 2), (64, 3), (64, 4), (128, 2), (128, 3)]


def visible_pairs(length: int, window: int) -> int:
  i = np.arange(length)
  return int(np.sum(np.minimum(i, window) + 1))


def rel_err(x, ref) -> float:
  x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
  return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def time_fn(fn, *args, reps: int, calls: int = 10, warmup: int = 3) -> dict:
  """Milliseconds per call: median/min/max over `reps` groups of `calls` back-to-back calls, each
  group ended by a device sync, after compile and warm-up (keeps launch latency out)."""
  for _ in range(1 + warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / calls)
  return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
          "reps": reps, "calls_per_rep": calls}


def fwd_and_train(attn):
  """jitted forward, and forward+backward returning (dq, dk, dv) for a given output cotangent."""
  def train(q, k, v, do):
    _, vjp = jax.vjp(attn, q, k, v)
    return vjp(do)
  return jax.jit(attn), jax.jit(train)


# Per implementation: its kernel module, the sizes a sweep starts from, how its kernels take the
# ALiBi slopes ([heads] -> their argument), and per kernel the fields swept and their candidates.
SWEEPS = {
    # Candidate tiles are <= 128 and 16640 = 130 * 128: the kernels run on the unpadded inputs.
    "triton": (sw, sw.SlidingWindowBlockSizes(block_q=128, block_k=128, block_q_dkv=128,
                                              block_k_dkv=128, block_q_dq=128, block_k_dq=128),
               lambda slopes, heads: slopes, {
                   "fwd": (("block_q", "block_k", "num_warps", "num_stages"), FWD_CANDIDATES),
                   "dkv": (("block_k_dkv", "block_q_dkv", "num_warps_dkv", "num_stages_dkv"),
                           DKV_CANDIDATES),
                   "dq": (("block_q_dq", "block_k_dq", "num_warps_dq", "num_stages_dq"),
                          DQ_CANDIDATES)}),
    "mosaic": (sw_mosaic, sw_mosaic.MosaicBlockSizes(), sw_mosaic._slope_rows, {
        "fwd": (("block_k", "stages"), MOSAIC_CANDIDATES),
        "dkv": (("block_q_dkv", "stages_dkv"), MOSAIC_CANDIDATES),
        "dq": (("block_k_dq", "stages_dq"), MOSAIC_CANDIDATES)}),
}
# Each kernel's function in its module and its outputs (the reference's names), in order.
KERNELS = {"fwd": ("_forward", ("out",)), "dkv": ("_dkv", ("dk", "dv")), "dq": ("_dq", ("dq",))}


def sweep(impl, q, k, v, slopes, do, want, *, window, scale, reps, interpret):
  """Checks and times each kernel of `impl` alone over its candidates; returns rows and the best
  sizes (the fastest candidate within 1e-2 of the reference, per kernel)."""
  module, base, slope_arg, tables = SWEEPS[impl]
  static = dict(window=window, scale=scale, alibi=True, interpret=interpret)
  fwd_args = (q, k, v, slope_arg(slopes, q.shape[2]))
  _, lse = module._forward(*fwd_args, block_sizes=base, **static)
  delta = jnp.einsum("bthd,bthd->bht", want["out"].astype(jnp.float32), do.astype(jnp.float32))
  bwd_args = (*fwd_args, do, lse, delta)
  rows, best = [], {}
  for name, (fields, candidates) in tables.items():
    function, outputs = KERNELS[name]
    kernel = functools.partial(getattr(module, function), **static)
    for cand in candidates:
      tiles = dict(zip(fields, cand))
      row = {"kernel": name, "tiles": tiles}
      try:
        fn = functools.partial(kernel, block_sizes=dataclasses.replace(base, **tiles))
        args = fwd_args if name == "fwd" else bwd_args
        got = fn(*args)
        got = tuple(got) if isinstance(got, (tuple, list)) else (got,)
        row["rel_err"] = {o: rel_err(g, want[o]) for o, g in zip(outputs, got)}
        row.update(time_fn(fn, *args, reps=reps))
      except Exception as e:  # a candidate that fails to compile (e.g. shared memory) is recorded
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      rows.append(row)
      ok = "error" not in row and max(row["rel_err"].values()) < 1e-2
      if ok and (name not in best or row["median_ms"] < best[name]["median_ms"]):
        best[name] = row
      print(f"sweep {impl} {name} {cand}: {row.get('median_ms', row.get('error'))} "
            f"{row.get('rel_err', '')}", flush=True)
  chosen = dataclasses.replace(base, **{f: x for r in best.values() for f, x in r["tiles"].items()})
  return rows, chosen


def timed_impls(q, k, v, slopes, *, window, scale, block_sizes, interpret):
  """({row name: attention(q, k, v)}, {impl: why it cannot run this shape}): every registered
  kernel implementation of the op (drt_jax/model/attention_impls.py) with and without ALiBi
  (with block_sizes[impl] where given), cuDNN's sliding window (no ALiBi: it has none but a dense
  bias), and the plain-JAX reference ("xla") last."""
  op = attention_impls.SLIDING_WINDOW
  settings = dict(window=window, scale=scale)
  runnable, unsupported = op.kernels(q, k, v, slopes, **settings)
  for name, reason in unsupported.items():
    print(f"{name}: not timed ({reason})", flush=True)
  rows = {}
  for name, entry in runnable.items():
    extra = dict(block_sizes=block_sizes[name]) if name in block_sizes else {}
    fn = functools.partial(entry.fn, interpret=interpret, **settings, **extra)
    rows[f"{name}_alibi"] = functools.partial(fn, slopes=slopes)
    rows[f"{name}_no_alibi"] = fn
  rows["cudnn_no_alibi"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=True, local_window_size=(window, 0), implementation="cudnn")
  rows["xla_alibi"] = functools.partial(op.implementations["xla"].fn, slopes=slopes, **settings)
  return rows, unsupported


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", required=True)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=16640)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--window", type=int, default=512)
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--sweep", action="store_true")
  parser.add_argument("--interpret", action="store_true",
                      help="Pallas interpreter: a CPU smoke test of this script at small shapes")
  args = parser.parse_args()

  device = jax.devices()[0]
  shape = (args.batch, args.length, args.heads, args.head_dim)
  scale = args.head_dim ** -0.5
  window = args.window
  keys = jax.random.split(jax.random.PRNGKey(int(time.time())), 4)
  q, k, v, do = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16) for key in keys)
  slopes = jnp.asarray(sw.alibi_slopes(args.heads), jnp.float32)

  # Oracle: the reference on the same bf16 values upcast to f32, with f32 (not TF32) matmuls.
  def reference_f32(slopes):
    ref = lambda q, k, v: sw.sliding_window_reference(q, k, v, slopes, window=window, scale=scale)
    with jax.default_matmul_precision("highest"):
      f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
      out, vjp = jax.vjp(ref, *f32[:3])
      dq, dk, dv = vjp(f32[3])
    return {"out": out, "dq": dq, "dk": dk, "dv": dv}

  want = reference_f32(slopes)
  result = {"date": datetime.date.today().isoformat(), "device": device.device_kind,
            "compute_capability": getattr(device, "compute_capability", None),
            "jax": jax.__version__, "shape": list(shape), "window": window, "dtype": "bfloat16",
            "command": " ".join(["python3"] + sys.argv)}
  block_sizes = {"triton": sw.SlidingWindowBlockSizes.for_device(),
                 "mosaic": sw_mosaic.MosaicBlockSizes()}
  if args.sweep:
    runnable, _ = attention_impls.SLIDING_WINDOW.kernels(q, k, v, slopes, window=window,
                                                         scale=scale)
    result["sweep"] = {}
    for impl in SWEEPS:
      if impl in runnable:
        result["sweep"][impl], block_sizes[impl] = sweep(
            impl, q, k, v, slopes, do, want, window=window, scale=scale, reps=args.reps,
            interpret=args.interpret)
  result["block_sizes"] = {impl: dataclasses.asdict(b) for impl, b in block_sizes.items()}

  impls, result["unsupported"] = timed_impls(q, k, v, slopes, window=window, scale=scale,
                                             block_sizes=block_sizes, interpret=args.interpret)
  want_no_alibi = reference_f32(None)
  fwd_flops = 4 * args.batch * args.heads * args.head_dim * visible_pairs(args.length, window)
  rows = {}
  for name, attn in impls.items():
    row = {}
    try:
      fwd, train = fwd_and_train(attn)
      oracle = want_no_alibi if "no_alibi" in name else want
      out = fwd(q, k, v)
      grads = train(q, k, v, do)
      row["rel_err"] = {"out": rel_err(out, oracle["out"]),
                        **{n: rel_err(g, oracle[n]) for n, g in zip(("dq", "dk", "dv"), grads)}}
      row["finite"] = bool(all(jnp.isfinite(x).all() for x in (out, *grads)))
      calls = 2 if name.startswith("xla") else 10
      row["fwd"] = time_fn(fwd, q, k, v, reps=args.reps, calls=calls)
      row["fwd_bwd"] = time_fn(train, q, k, v, do, reps=args.reps, calls=calls)
      row["fwd"]["tflops"] = fwd_flops / row["fwd"]["median_ms"] / 1e9
      row["fwd_bwd"]["tflops"] = 3.5 * fwd_flops / row["fwd_bwd"]["median_ms"] / 1e9
    except Exception as e:
      row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    rows[name] = row
    print(name, json.dumps(row), flush=True)
  result["impls"] = rows
  ratios = {}
  kernels = [name for name in rows if name.endswith("_alibi") and "no_alibi" not in name
             and name != "xla_alibi"]
  for name in kernels:
    for other in ("cudnn_no_alibi", "xla_alibi"):
      if "fwd" in rows[name] and "fwd" in rows[other]:
        for phase in ("fwd", "fwd_bwd"):
          ratios[f"{phase}_{name}_over_{other}"] = (rows[name][phase]["median_ms"]
                                                   / rows[other][phase]["median_ms"])
  result["ratios"] = ratios
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)

  print(f"\n{device.device_kind}  shape {shape}  W={window}  bf16")
  for impl, sizes in block_sizes.items():
    print(f"{impl} block sizes: {sizes}")
  print(f"{'impl':18s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'f+b ms':>8s} {'TFLOP/s':>8s}  max rel err")
  for name, row in rows.items():
    if "error" in row:
      print(f"{name:18s} ERROR {row['error'][:200]}")
      continue
    print(f"{name:18s} {row['fwd']['median_ms']:8.3f} {row['fwd']['tflops']:8.1f} "
          f"{row['fwd_bwd']['median_ms']:8.3f} {row['fwd_bwd']['tflops']:8.1f}  "
          f"{max(row['rel_err'].values()):.2e}")
  for name, ratio in ratios.items():
    print(f"{name}: {ratio:.3f}")


if __name__ == "__main__":
  main()
