"""Data-parallel and FSDP training of the paper's DRT on one vs two GPUs of one host.

  python3 bench/multi_gpu.py --out $OUT/multi_gpu.json [--steps 30] [--runs 1gpu,dp,fsdp,dp_2proc]

Every run is the real loop, `python -m drt_jax.train`, on configs/drt_pg19.py (Pallas kernels,
16380 tokens per sequence) with the pydoc corpus and the byte tokenizer instead of PG19 and GPT-2
(no download; model.vocab_size=259), 4 sequences per GPU, --steps steps from the same init
(--config and --set change the config, e.g. for a CPU smoke test of this script):

  1gpu      1 process, 1 GPU                                       global batch 4
  dp        1 process, 2 GPUs, mesh data=2                         global batch 8
  fsdp      1 process, 2 GPUs, mesh fsdp=2 (params, Adam state split) global batch 8
  dp_2proc  2 processes x 1 GPU (launch/local_multiprocess.sh), data=2  global batch 8

Step time: the mean over the logging intervals after the first (compilation and warm-up excluded),
from the run's metrics.jsonl; tokens/s = global batch x data.seq_len / step time. Reported: each
2-GPU run's throughput over 1gpu's, and the losses of fsdp and dp_2proc against dp's (the same batches
from the same init, so they must agree to bf16 accuracy). Prints a table; writes --out after every
run, so a run cut short still leaves the finished ones; --merge adds the runs of an earlier --out
(runs that do not fit in one command's time limit).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_GPU_BATCH = 4
LOG_EVERY = 10
LOSS_TOLERANCE = 0.02  # |loss difference| accepted between shardings of one bf16 computation

# name -> (GPUs, processes, mesh overrides)
RUNS = {
    "1gpu": (1, 1, ["--config.mesh.data=1"]),
    "dp": (2, 1, ["--config.mesh.data=2"]),
    "fsdp": (2, 1, ["--config.mesh.data=1", "--config.mesh.fsdp=2"]),
    "dp_2proc": (2, 2, ["--config.mesh.data=2"]),
}
# The paper config, made download-free. eval_fraction 0.3 holds out 9 windows of 16380 tokens of
# pydoc (~490k bytes): the one eval batch of 8 sequences needs 8.
DATA_FLAGS = ["--config.data.source=pydoc", "--config.data.tokenizer=byte",
              "--config.model.vocab_size=259", "--config.data.eval_fraction=0.3",
              "--config.train.eval_batches=1", f"--config.train.log_every={LOG_EVERY}"]


def command(name: str, workdir: str, args) -> tuple[list[str], dict]:
  gpus, processes, mesh = RUNS[name]
  flags = ["--config", args.config, "--workdir", workdir, f"--steps_this_run={args.steps}",
           *DATA_FLAGS, *mesh, f"--config.train.global_batch_size={PER_GPU_BATCH * gpus}",
           *args.set]
  env = dict(os.environ)
  # Only the host platform reads this: on CPU it fakes the run's devices; on GPU it changes nothing.
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                      f"{gpus // processes}").strip()
  if processes == 1:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(gpus)))
    return [sys.executable, "-m", "drt_jax.train", *flags], env
  env.update(PYTHON=sys.executable, GPUS_PER_PROCESS=str(gpus // processes),
             LOG_DIR=os.path.join(workdir, "process_logs"))
  return ["bash", os.path.join(REPO, "launch/local_multiprocess.sh"), str(processes), *flags], env


def run(name: str, root: str, args) -> dict:
  workdir = os.path.join(root, name)
  cmd, env = command(name, workdir, args)
  print(f"--- {name}: {' '.join(cmd)}", flush=True)
  start = time.perf_counter()
  try:
    done = subprocess.run(cmd, env=env, cwd=REPO, timeout=args.run_timeout, capture_output=True,
                          text=True)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {args.run_timeout} s"}
  wall = time.perf_counter() - start
  if done.returncode != 0:
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
    print(tail, flush=True)
    return {"error": f"exit {done.returncode}", "output_tail": tail}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(workdir, "config.json")) as f:
    seq_len = json.load(f)["data"]["seq_len"]
  shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)  # ~1.5 GB each
  train = [r for r in records if "loss" in r]
  timed = train[1:] or train  # the first interval holds warm-up
  step_s = sum(r["step_time_s"] for r in timed) / len(timed)
  gpus, processes, mesh = RUNS[name]
  return {
      "gpus": gpus, "processes": processes, "mesh": mesh,
      "global_batch_size": PER_GPU_BATCH * gpus, "seq_len": seq_len, "steps": args.steps,
      "step_time_s": step_s, "tokens_per_s": PER_GPU_BATCH * gpus * seq_len / step_s,
      "mfu": sum(r["mfu"] for r in timed) / len(timed) if "mfu" in timed[0] else None,
      "losses": {r["step"]: r["loss"] for r in train},
      "eval_loss": next((r["eval_loss"] for r in records if "eval_loss" in r), None),
      "wall_s_with_compile": wall,
  }


def compare(results: dict) -> dict:
  """Throughput of each 2-GPU run over 1gpu's; loss differences of fsdp and dp_2proc against dp."""
  summary = {}
  ok = {name: r for name, r in results.items() if "error" not in r}
  for name in ("dp", "fsdp", "dp_2proc"):
    if name in ok and "1gpu" in ok:
      ratio = ok[name]["tokens_per_s"] / ok["1gpu"]["tokens_per_s"]
      summary[f"throughput_ratio_{name}_vs_1gpu"] = ratio
  for name in ("fsdp", "dp_2proc"):
    if name in ok and "dp" in ok:
      diffs = [abs(ok[name]["losses"][s] - ok["dp"]["losses"][s]) for s in ok["dp"]["losses"]
               if s in ok[name]["losses"]]
      if ok[name]["eval_loss"] is not None and ok["dp"]["eval_loss"] is not None:
        diffs.append(abs(ok[name]["eval_loss"] - ok["dp"]["eval_loss"]))
      summary[f"max_loss_diff_{name}_vs_dp"] = max(diffs)
      summary[f"loss_match_{name}_vs_dp"] = max(diffs) <= LOSS_TOLERANCE
  return summary


def print_table(results: dict, summary: dict):
  print(f"\n{'run':9} {'GPUs':>4} {'procs':>5} {'batch':>5} {'step ms':>9} {'tokens/s':>10} "
        f"{'MFU':>6} {'last loss':>9} {'eval':>7}")
  for name, r in results.items():
    if "error" in r:
      print(f"{name:9} {r['error']}")
      continue
    last = r["losses"][max(r["losses"])]
    print(f"{name:9} {r['gpus']:4d} {r['processes']:5d} {r['global_batch_size']:5d} "
          f"{r['step_time_s'] * 1e3:9.1f} {r['tokens_per_s']:10.0f} "
          f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%'):>6} {last:9.4f} "
          f"{r['eval_loss'] or float('nan'):7.4f}")
  for key, value in summary.items():
    print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def gpu_names() -> list[str]:
  """nvidia-smi's GPU names. Not jax.devices(): this process would hold GPU memory the runs need."""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60).stdout
  except (OSError, subprocess.TimeoutExpired):
    return []
  return [line.strip() for line in out.splitlines() if line.strip()]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file for the results")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--runs", default="1gpu,dp,fsdp", help=f"comma-separated, of {list(RUNS)}")
  parser.add_argument("--run_timeout", type=int, default=420, help="seconds per run")
  parser.add_argument("--merge", help="an earlier --out whose runs join this report")
  parser.add_argument("--config", default=os.path.join(REPO, "configs/drt_pg19.py"))
  parser.add_argument("--set", action="append", default=[], metavar="--config.FIELD=VALUE",
                      help="extra train flag for every run (repeatable)")
  args = parser.parse_args()
  names = args.runs.split(",")
  unknown = [name for name in names if name not in RUNS]
  if unknown:
    parser.error(f"--runs: unknown {unknown}; known: {list(RUNS)}")
  if args.steps <= LOG_EVERY:
    parser.error(f"--steps={args.steps}: must exceed {LOG_EVERY} (the first interval is warm-up)")

  report = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "gpus": gpu_names(),
            "per_gpu_batch": PER_GPU_BATCH, "results": {}}
  if args.merge:
    with open(args.merge) as f:
      report["results"] = json.load(f)["results"]
    for r in report["results"].values():
      if "losses" in r:  # JSON made the step keys strings
        r["losses"] = {int(step): loss for step, loss in r["losses"].items()}
  root = tempfile.mkdtemp(prefix="drt_multi_gpu_")
  for name in names:
    report["results"][name] = run(name, root, args)
    report["summary"] = compare(report["results"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
  print_table(report["results"], report["summary"])
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
