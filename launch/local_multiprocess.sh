#!/usr/bin/env bash
# N processes of `python -m drt_jax.train` on this machine, joined by JAX's distributed runtime over
# 127.0.0.1: a multi-host run without a cluster (launch/README.md).
#
#   launch/local_multiprocess.sh N --config configs/tiny.py --workdir runs/tiny_2p [train flags]
#
# Environment:
#   PYTHON            interpreter (default: the repository's .venv/bin/python, else python3)
#   GPUS_PER_PROCESS  g: process i sees GPUs i*g .. i*g+g-1 (CUDA_VISIBLE_DEVICES); unset: no change
#   PORT              coordinator port (default: a free one)
#   LOG_DIR           where processes 1..N-1 write their output (default: a new temporary folder)
# Process 0 prints to this terminal. If any process fails, the others are stopped and the exit
# status is the failed one's.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [python -m drt_jax.train flags...]" >&2
  exit 2
fi
num_processes=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
[[ -x $python ]] || python=python3
free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
port=${PORT:-$("$python" -c "$free_port")}
log_dir=${LOG_DIR:-$(mktemp -d -t drt_processes.XXXXXX)}
mkdir -p "$log_dir"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait || true
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  gpus=()
  if [[ -n ${GPUS_PER_PROCESS:-} ]]; then
    first=$((i * GPUS_PER_PROCESS))
    gpus=("CUDA_VISIBLE_DEVICES=$(seq -s, "$first" $((first + GPUS_PER_PROCESS - 1)))")
  fi
  command=(env "${gpus[@]}" "$python" -m drt_jax.train "$@" --coordinator_address="127.0.0.1:$port"
           --num_processes="$num_processes" --process_id="$i")
  if ((i == 0)); then
    "${command[@]}" &
  else
    "${command[@]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# A process that dies leaves the others waiting in a collective: stop them at the first failure.
for ((i = 0; i < num_processes; i++)); do
  if wait -n; then
    continue
  else
    status=$?
    echo "$0: a process exited with status $status; stopping the others" >&2
    stop_all
    for ((j = 1; j < num_processes; j++)); do
      if [[ -s $log_dir/process_$j.log ]]; then
        echo "--- last lines of process $j ($log_dir/process_$j.log) ---" >&2
        tail -n 20 "$log_dir/process_$j.log" >&2
      fi
    done
    exit "$status"
  fi
done
