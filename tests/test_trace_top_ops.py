"""bench/trace_top_ops.py on a jax.profiler trace of the CPU and on a GPU-shaped trace file."""

import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import trace_top_ops  # noqa: E402


def test_a_cpu_trace_of_a_jitted_function_names_its_ops_and_scopes(tmp_path):
  @jax.jit
  def f(x):
    with jax.named_scope("product"):
      y = x @ x
    with jax.named_scope("sorting"):  # a sort is never fused with the product
      return jnp.sort(y, axis=0)

  x = jax.random.normal(jax.random.key(0), (256, 256))
  compiled = f.lower(x).compile()
  hlo = tmp_path / "f.hlo.txt"
  hlo.write_text(compiled.as_text())
  compiled(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      compiled(x).block_until_ready()
  summary = trace_top_ops.summarize(trace_top_ops.find_trace(str(tmp_path)), str(hlo), steps=2)
  assert summary["device_ms_per_step"] > 0
  assert summary["top_ops"] and all(r["count_per_step"] >= 1 for r in summary["top_ops"])
  assert {"product", "sorting"} <= {r["scope"].split("/")[0] for r in summary["by_scope"]}


def test_a_gpu_trace_counts_stream_kernels_once_by_kind_and_scope(tmp_path):
  meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
          {"ph": "M", "pid": 1, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
  def kernel(name, dur, tf_op, tid=7, pid=1, hlo_op="fusion.3"):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": 0, "dur": dur, "name": name,
            "args": {"hlo_op": hlo_op, "tf_op": tf_op}}
  events = meta + [
      kernel("nvjet_sm90_tst_128x160", 3000, "jit(step)/transpose(jvp(DRT))/lower_2/mlp/up:dot"),
      kernel("nvjet_sm90_tst_128x160", 1000, "jit(step)/jvp(DRT)/lower_0/mlp/up:dot"),
      kernel("sliding_window_fwd", 2000, "jit(step)/jvp(DRT)/lower_1/attn/sliding_window_attention"),
      kernel("loop_add_fusion", 500, "jit(step)/optimizer/add:add"),
      # Inside a command buffer (XLA's default on the GPU) a kernel names no op and no scope.
      kernel("loop_multiply_fusion", 1500, "XlaModule", hlo_op="command_buffer_3"),
      kernel("XLA op range", 9000, "", tid=9),  # a derived line: not a kernel
      kernel("host work", 9000, "", pid=2)]
  path = tmp_path / "x.trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  summary = trace_top_ops.summarize(trace_top_ops.find_trace(str(tmp_path)), None, steps=2)
  assert summary["device_ms_per_step"] == 4.0
  kinds = {r["category"]: r["ms_per_step"] for r in summary["by_category"]}
  assert kinds == {"matmul": 2.0, "attention kernel": 1.0, "other": 1.0}
  assert summary["command_buffer_share"] == 0.75 / 4.0
  scopes = {r["scope"]: r["ms_per_step"] for r in summary["by_scope"]}
  assert scopes["bwd lower_*/mlp/up"] == 1.5 and scopes["lower_*/mlp/up"] == 0.5
  assert scopes["lower_*/attn/sliding_window_attention"] == 1.0
  assert scopes["(command buffer)"] == 0.75
