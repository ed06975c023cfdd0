"""The top device ops of a `jax.profiler` trace by time, read from its trace.json.gz (no UI needed).

  python bench/trace_top_ops.py TRACE_DIR [--hlo STEP.hlo.txt] [--steps N] [--top 30] [--json F]

TRACE_DIR is what jax.profiler.trace(TRACE_DIR) wrote (its newest plugins/profile/*/
*.trace.json.gz is read) or that file itself. On a GPU the kernels of the device's stream lines are
counted; on the CPU, the host events that name an XLA op. With --hlo (the compiled step's
`as_text()`, which bench/train_step.py --profile_steps writes beside the trace) every op is
attributed to the named scope of its HLO instruction (`jax.named_scope` and Flax module names);
"bwd" marks ops of the backward pass. Times are divided by --steps, the steps the trace holds.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re

MATMUL = re.compile(r"gemm|cublas|nvjet|cutlass|xmma|wgmma|matmul|\bdot\b", re.IGNORECASE)
ATTENTION = re.compile(r"sliding_window|gca|flash|attention", re.IGNORECASE)
COPY = re.compile(r"memcpy|memset|copy", re.IGNORECASE)
INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
OP_NAME = re.compile(r'op_name="([^"]*)"')
COMMAND_BUFFER_SCOPE = "(command buffer)"
COMMAND_BUFFER_HINT = ("trace with command buffers off (XLA_FLAGS="
                       "--xla_gpu_enable_command_buffer=, or bench/train_step.py "
                       "--no_command_buffers) to attribute kernels to scopes")


def find_trace(path: str) -> str:
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
  if not found:
    raise SystemExit(f"error: {path}: no *.trace.json.gz below it")
  return max(found, key=os.path.getmtime)


def hlo_index(path: str | None) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (op_name scope, the instruction's text) of a compiled module's text."""
  if not path:
    return {}
  index = {}
  with open(path) as f:
    for line in f:
      match = INSTRUCTION.match(line)
      if match:
        scope = OP_NAME.search(line)
        index[match.group(1)] = (scope.group(1) if scope else "", match.group(2))
  return index


def short_scope(op_name: str, depth: int) -> str:
  """'jit(_train_step)/transpose(jvp(DRT))/group_0_3/gca/...' -> 'bwd group_*/gca' (depth parts)."""
  backward = "transpose(" in op_name
  parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "pjit("))]
  parts = [re.sub(r"^(?:\w+\()+([^()]*)\)+$", r"\1", p) for p in parts]  # jvp(DRT) -> DRT
  parts = [re.sub(r"_\d+(_\d+)?$", "_*", p) for p in parts if p not in ("DRT", "SlidingWindowLM")]
  return ("bwd " if backward else "") + ("/".join(parts[:depth]) or "(no scope)")


def device_events(trace: dict) -> list[dict]:
  """Kernel events of the device's stream lines; on a trace with no device, host XLA-op events."""
  processes = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  complete = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  on_device = [e for e in complete if e["pid"] in devices]
  streams = [e for e in on_device if threads.get((e["pid"], e["tid"]), "").startswith("Stream")]
  if streams:
    return streams
  if on_device:
    return on_device
  return [e for e in complete if "hlo_op" in e.get("args", {}) and not e["name"].startswith("end:")]


def category(kernel: str, hlo_op: str, instruction: str) -> str:
  text = f"{kernel} {hlo_op}"
  if "__gpu$xla.gpu.triton" in instruction:  # a Pallas kernel (XLA's own Triton gemms are fusions)
    return "attention kernel"
  if MATMUL.search(text) or "__cublas" in instruction:
    return "matmul"
  if ATTENTION.search(kernel):
    return "attention kernel"
  if COPY.search(text):
    return "copy"
  return "other"


def summarize(trace_path: str, hlo_path: str | None, steps: int, depth: int = 3) -> dict:
  with gzip.open(trace_path, "rt") as f:
    trace = json.load(f)
  index = hlo_index(hlo_path)
  ops = collections.defaultdict(lambda: {"us": 0.0, "count": 0})
  events = device_events(trace)
  for event in events:
    args = event.get("args", {})
    hlo_op = args.get("hlo_op") or args.get("long_name") or event["name"]
    scope, instruction = index.get(hlo_op, ("", ""))
    # tf_op holds the kernel's op_name ("<op_name>:<op>" or the op_name). Inside an XLA command
    # buffer (a CUDA graph, XLA's default on the GPU) it is only "XlaModule" and hlo_op names the
    # buffer: no scope can be had, see COMMAND_BUFFER_HINT.
    tf_op = args.get("tf_op", "").rsplit(":", 1)[0]
    scope = tf_op if "/" in tf_op else scope
    if not scope and hlo_op.startswith("command_buffer"):
      scope = COMMAND_BUFFER_SCOPE
    key = (hlo_op, event["name"], scope, category(event["name"], hlo_op, instruction))
    ops[key]["us"] += event["dur"]
    ops[key]["count"] += 1
  total = sum(v["us"] for v in ops.values())
  hidden = sum(v["us"] for k, v in ops.items() if k[2] == COMMAND_BUFFER_SCOPE)
  rows = sorted(({"hlo_op": k[0], "kernel": k[1], "scope": short_scope(k[2], 8), "category": k[3],
                  "ms_per_step": v["us"] / 1e3 / steps, "count_per_step": v["count"] / steps,
                  "share": v["us"] / total if total else 0.0} for k, v in ops.items()),
                key=lambda r: -r["ms_per_step"])

  def by(field):
    groups = collections.defaultdict(float)
    for k, v in ops.items():
      groups[short_scope(k[2], depth) if field == "scope" else k[3]] += v["us"]
    return sorted(({field: name, "ms_per_step": us / 1e3 / steps,
                    "share": us / total if total else 0.0} for name, us in groups.items()),
                  key=lambda r: -r["ms_per_step"])

  return {"trace": trace_path, "steps": steps, "device_ms_per_step": total / 1e3 / steps,
          "event_arg_keys": sorted(events[0].get("args", {})) if events else [],
          "command_buffer_share": hidden / total if total else 0.0,
          "by_category": by("category"), "by_scope": by("scope"), "top_ops": rows}


def print_summary(summary: dict, top: int = 30) -> None:
  print(f"device time {summary['device_ms_per_step']:.2f} ms/step ({summary['trace']}; event "
        f"args {summary['event_arg_keys']})")
  print(f"{'category':20} {'ms/step':>9} {'share':>6}")
  for r in summary["by_category"]:
    print(f"{r['category']:20} {r['ms_per_step']:9.2f} {r['share']:6.1%}")
  if summary["command_buffer_share"] > 0.5:
    print(f"{summary['command_buffer_share']:.0%} of the time ran in XLA command buffers, which "
          f"hide each kernel's scope: {COMMAND_BUFFER_HINT}")
  print(f"\n{'scope':48} {'ms/step':>9} {'share':>6}")
  for r in summary["by_scope"][:top]:
    print(f"{r['scope'][:48]:48} {r['ms_per_step']:9.2f} {r['share']:6.1%}")
  print(f"\n{'kernel':36} {'category':16} {'ms/step':>8} {'n':>5} {'share':>6}  scope")
  for r in summary["top_ops"][:top]:
    print(f"{r['kernel'][:36]:36} {r['category']:16} {r['ms_per_step']:8.3f} "
          f"{r['count_per_step']:5.0f} {r['share']:6.1%}  {r['scope'][:70]}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace", help="the jax.profiler log folder, or a *.trace.json.gz file")
  parser.add_argument("--hlo", help="the compiled module's text, to attribute ops to scopes")
  parser.add_argument("--steps", type=int, default=1, help="steps the trace holds")
  parser.add_argument("--depth", type=int, default=3, help="scope parts kept in the scope table")
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--json", help="write the whole summary here")
  args = parser.parse_args()
  summary = summarize(find_trace(args.trace), args.hlo, args.steps, args.depth)
  print_summary(summary, args.top)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()
