"""Every registered GCA implementation against the XLA reference at the paper's training shape.

`python3 bench/gca.py --out FILE.json [--tune]` on a GPU. One run: correctness of every timed
implementation of the GCA op (drt_jax/model/attention_impls.py: the Triton kernels, the Mosaic GPU
ones once registered; one that cannot run this shape is listed with its reason) against the f32
reference, then median forward and forward+backward (grads of q, k_mem, v_mem, weights) times of
each (its gather included) and of the reference ("xla", jitted, gather included), the device's
copy bandwidth, and each kernel's achieved bandwidth. --tune adds Triton block-size variants.
Prints a table last and writes everything to FILE.json.
"""

import argparse
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.model import attention_impls
from kernels_pallas import gca as gca_lib

# docs/specification.md §2.9: 4 x 259 query chunks of 64 rows, 12 heads of 64, k = 8 over 260 memory
# chunks whose landmark row is masked (num_keys = 63) with softmax-off-by-one.
SHAPE = dict(batch=4, chunks=259, chunk_len=64, heads=12, kv_heads=12, head_dim=64,
             mem_chunks=260, k=8)
SETTINGS = dict(scale=64**-0.5, num_keys=63, softmax_off_by_one=True)

# Triton variants timed with --tune, each against the default (which the table in
# kernels_pallas/gca.py sets): forward stages 1/3, and each backward kernel's stages changed alone.
TUNE = {
    "fwd_s1": dict(num_stages=1),
    "fwd_s3": dict(num_stages=3),
    "dq_s2": dict(num_stages_dq=2),
    "dkv_s2": dict(num_stages_dkv=2),
}


def make_inputs(seed):
  """bf16 q/K/V/dO; query chunk n serves chunk n + 1 and retrieves among chunks 0..n (strictly
  earlier), so its slots past n are invalid (weight 0); valid weights are a softmax of scores."""
  s = SHAPE
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  q_shape = (s["batch"], s["chunks"], s["chunk_len"], s["heads"], s["head_dim"])
  mem_shape = (s["batch"], s["mem_chunks"], s["chunk_len"], s["kv_heads"], s["head_dim"])
  q = jax.random.normal(keys[0], q_shape, jnp.bfloat16)
  k_mem = jax.random.normal(keys[1], mem_shape, jnp.bfloat16)
  v_mem = jax.random.normal(keys[2], mem_shape, jnp.bfloat16)
  slot_shape = (s["batch"], s["chunks"], s["k"])
  visible = jnp.arange(s["chunks"])[None, :, None] + 1
  indices = jnp.floor(jax.random.uniform(keys[3], slot_shape) * visible).astype(jnp.int32)
  valid = jnp.arange(s["k"])[None, None, :] < visible
  scores = jnp.where(valid, jax.random.normal(keys[4], slot_shape), -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1)
  do = jax.random.normal(keys[5], q_shape, jnp.bfloat16)
  return q, k_mem, v_mem, indices, weights, do


def fwd_bwd(impl):
  def run(q, k_mem, v_mem, indices, weights, do):
    out, vjp = jax.vjp(lambda q, k, v, w: impl(q, k, v, indices, w), q, k_mem, v_mem, weights)
    return out, vjp(do)
  return jax.jit(run)


def fwd_only(impl):
  return jax.jit(lambda q, k_mem, v_mem, indices, weights, do: impl(q, k_mem, v_mem, indices,
                                                                     weights))


def time_ms(fn, args, reps, inner):
  """Median over `reps` of the mean time of `inner` back-to-back calls (ms), after warm-up."""
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / inner * 1e3)
  return dict(median_ms=float(np.median(times)), min_ms=float(np.min(times)),
              max_ms=float(np.max(times)), reps=reps, inner=inner)


def copy_bandwidth(reps, inner):
  """Device-to-device copy of 2 GiB, counting bytes read plus written (GB/s)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2**29,), jnp.float32)
  t = time_ms(jax.jit(jnp.copy), (x,), reps, inner)
  return dict(bytes=2 * x.nbytes, **t, gbps=2 * x.nbytes / t["median_ms"] / 1e6)


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if not np.all(np.isfinite(x)):
    return float("inf")
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def traffic(weights):
  """FLOPs and HBM bytes. Minimum: each input read and each output written once. Gathered: what
  the kernels read as written, every retrieval re-reading its tiles (L2 hits not subtracted); the
  dK/dV kernel skips weight-0 slots."""
  s = SHAPE
  bf16, f32 = 2, 4
  slots = s["batch"] * s["chunks"] * s["k"]
  valid = int(jnp.sum(weights != 0))
  chunk_rows = s["chunk_len"] * s["heads"] * s["head_dim"] * bf16  # one query chunk of q/o/do/dq
  chunk_lse = s["chunk_len"] * s["heads"] * f32  # one slot's log-sum-exp
  mem_tile = s["chunk_len"] * s["kv_heads"] * s["head_dim"] * bf16  # one memory chunk of K or V
  rows = s["batch"] * s["chunks"] * chunk_rows
  mem = s["batch"] * s["mem_chunks"] * mem_tile
  lse = slots * chunk_lse
  tile_flops = 2 * s["heads"] * s["chunk_len"] ** 2 * s["head_dim"]  # one tile matmul, all heads
  return dict(
      fwd_flops=2 * slots * tile_flops,  # QK^T, PV
      bwd_flops=(3 * slots + 4 * valid) * tile_flops,  # dQ: QK^T, dO V^T, dS K; dK/dV: 4
      fwd_min_bytes=2 * rows + 2 * mem + lse,
      fwd_gathered_bytes=2 * rows + 2 * slots * mem_tile + lse,
      bwd_min_bytes=3 * rows + 4 * mem + lse,
      bwd_gathered_bytes=(3 * rows + 2 * slots * mem_tile + lse)  # dQ kernel
      + (4 * mem + valid * (2 * chunk_rows + chunk_lse)),  # dK/dV kernel
      valid_slots=valid, slots=slots)


def check(impl, inputs, want):
  got = fwd_bwd(impl)(*inputs)
  got = (got[0], *got[1])
  return {name: rel_err(g, w) for name, g, w in zip(("out", "dq", "dk", "dv", "dw"), got, want)}


def kernel_variants(inputs, tune: bool, unsupported: dict) -> dict:
  """{name: gca-like function} for every registered kernel impl that runs this shape (the reason
  of each that does not goes into `unsupported`); Triton's --tune variants as "triton/<variant>"."""
  q, k_mem, v_mem, indices, weights, _ = inputs
  interpret = jax.default_backend() != "gpu"
  runnable, reasons = attention_impls.GCA.kernels(q, k_mem, v_mem, indices, weights, **SETTINGS)
  for name, reason in reasons.items():
    print(f"{name}: not timed ({reason})", flush=True)
  unsupported.update(reasons)
  variants = {}
  for name, entry in runnable.items():
    variants[name] = functools.partial(entry.fn, interpret=interpret, **SETTINGS)
    if name == "triton":  # its tiles named, so the report records them
      default = gca_lib.default_block_sizes(q.dtype, SHAPE["chunk_len"], SHAPE["head_dim"])
      variants[name] = functools.partial(variants[name], block_sizes=default)
      for variant, changes in TUNE.items() if tune else ():
        variants[f"triton/{variant}"] = functools.partial(
            variants[name], block_sizes=dataclasses.replace(default, **changes))
  return variants


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--inner", type=int, default=5)
  parser.add_argument("--tune", action="store_true", help="also time the TUNE variants")
  args = parser.parse_args()

  device = jax.devices()[0]
  inputs = make_inputs(0)
  q, k_mem, v_mem, indices, weights, do = inputs
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    want = fwd_bwd(functools.partial(gca_lib.gca_reference, **SETTINGS))(
        f32(q), f32(k_mem), f32(v_mem), indices, weights, f32(do))
  want = (want[0], *want[1])

  results = dict(device=str(device.device_kind), platform=device.platform,
                 compute_capability=getattr(device, "compute_capability", None),
                 jax=jax.__version__, shape=SHAPE, settings=SETTINGS,
                 date=time.strftime("%Y-%m-%d %H:%M:%S"), traffic=traffic(weights),
                 copy=copy_bandwidth(args.reps, args.inner), kernel={}, unsupported={})
  for name, impl in kernel_variants(inputs, args.tune, results["unsupported"]).items():
    block_sizes = impl.keywords.get("block_sizes")
    entry = dict(block_sizes=block_sizes and dataclasses.asdict(block_sizes),
                 rel_err=check(impl, inputs, want))
    entry["fwd"] = time_ms(fwd_only(impl), inputs, args.reps, args.inner)
    entry["fwd_bwd"] = time_ms(fwd_bwd(impl), inputs, args.reps, args.inner)
    results["kernel"][name] = entry
    print(name, entry["rel_err"], entry["fwd"]["median_ms"], entry["fwd_bwd"]["median_ms"],
          flush=True)
  ref = functools.partial(gca_lib.gca_reference, **SETTINGS)
  results["reference"] = dict(fwd=time_ms(fwd_only(ref), inputs, args.reps, args.inner),
                              fwd_bwd=time_ms(fwd_bwd(ref), inputs, args.reps, args.inner))
  results["retrievers"] = time_ms(
      jax.jit(lambda i, w: gca_lib.retrievers(i, w, SHAPE["mem_chunks"])), (indices, weights),
      args.reps, args.inner)

  tr, copy_gbps = results["traffic"], results["copy"]["gbps"]
  ref_fwd = results["reference"]["fwd"]["median_ms"]
  ref_fb = results["reference"]["fwd_bwd"]["median_ms"]
  for entry in results["kernel"].values():
    fwd, fb = entry["fwd"]["median_ms"], entry["fwd_bwd"]["median_ms"]
    bwd = fb - fwd
    entry["summary"] = dict(
        fwd_ms=fwd, fwd_bwd_ms=fb, bwd_ms=bwd, speedup_fwd=ref_fwd / fwd, speedup_fwd_bwd=ref_fb / fb,
        fwd_tflops=tr["fwd_flops"] / fwd / 1e9, bwd_tflops=tr["bwd_flops"] / bwd / 1e9,
        fwd_min_gbps=tr["fwd_min_bytes"] / fwd / 1e6,
        fwd_gathered_gbps=tr["fwd_gathered_bytes"] / fwd / 1e6,
        bwd_min_gbps=tr["bwd_min_bytes"] / bwd / 1e6,
        bwd_gathered_gbps=tr["bwd_gathered_bytes"] / bwd / 1e6,
        targets_met=dict(fwd_le_0p75ms=fwd <= 0.75, fwd_bwd_le_3ms=fb <= 3.0,
                         fwd_ge_7x=ref_fwd / fwd >= 7, fwd_bwd_ge_4x=ref_fb / fb >= 4))
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)

  print(f"\n{results['device']}  copy {copy_gbps:.0f} GB/s  reference fwd {ref_fwd:.3f} ms  "
        f"fwd+bwd {ref_fb:.3f} ms  retrievers {results['retrievers']['median_ms']:.3f} ms")
  print(f"{'impl':>15} {'fwd ms':>7} {'f+b ms':>7} {'bwd ms':>7} {'x fwd':>6} {'x f+b':>6} "
        f"{'fwd GB/s min/gath':>18} {'fwd TF':>7} {'bwd TF':>7} {'max rel err':>11}")
  for name, entry in results["kernel"].items():
    s = entry["summary"]
    print(f"{name:>15} {s['fwd_ms']:7.3f} {s['fwd_bwd_ms']:7.3f} {s['bwd_ms']:7.3f} "
          f"{s['speedup_fwd']:6.2f} {s['speedup_fwd_bwd']:6.2f} "
          f"{s['fwd_min_gbps']:8.0f}/{s['fwd_gathered_gbps']:<9.0f} {s['fwd_tflops']:7.1f} "
          f"{s['bwd_tflops']:7.1f} {max(entry['rel_err'].values()):11.2e}")


if __name__ == "__main__":
  main()
