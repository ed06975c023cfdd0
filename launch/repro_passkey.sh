#!/usr/bin/env bash
# The passkey length-generalisation reproduction on one GPU (configs/passkey_repro.py): train a small
# DRT on short sequences (data.seq_len) with passkey samples mixed in, then evaluate passkey retrieval at 1x,
# 4x, 16x, 64x, 256x and 1000x the training length (50 samples over 5 needle depths per length, 20
# at 1000x), with the chunk memory in host memory. Writes bench/results/passkey_repro.json and its
# plots (passkey_repro_heatmap.png, passkey_repro_accuracy.png) and prints each phase's wall time.
#
#   launch/repro_passkey.sh [all|train|eval]      (default: all)
#
# Training resumes from the run folder's newest checkpoint, so `train` can be repeated until it has
# reached the config's step count (set STEPS_PER_RUN to stop each call early, e.g. under a
# per-command time limit); `eval` needs a finished run.
# Environment:
#   PYTHON         interpreter (default: the repository's .venv/bin/python, else python3)
#   RUN_DIR        run folder (default: runs/passkey_repro)
#   OUT            results JSON (default: bench/results/passkey_repro.json)
#   STEPS_PER_RUN  train at most this many steps per call (default: to the end)
#   BATCH          sequences evaluated together (default: 10; host memory ~1 GB each at 1000x)
#   OVERRIDES      config fields for both phases, e.g. "model.topk=4 train.num_train_steps=6000"
#                  (a variant in its own RUN_DIR; a curriculum phase: "data.seq_len=2016
#                  train.init_from=runs/phase1"); the training length follows data.seq_len
set -euo pipefail

phase=${1:-all}
if [[ ! $phase =~ ^(all|train|eval)$ ]]; then
  echo "usage: $0 [all|train|eval]" >&2
  exit 2
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
python=${PYTHON:-$repo/.venv/bin/python}
[[ -x $python ]] || python=python3
config=configs/passkey_repro.py
run_dir=${RUN_DIR:-runs/passkey_repro}
out=${OUT:-bench/results/passkey_repro.json}
read -r -a overrides <<< "${OVERRIDES:-}"
flags=("${overrides[@]/#/--config.}")
train_len=$("$python" - "$config" "${overrides[@]}" <<'EOF'
import sys
from drt_jax import config as config_lib
config = config_lib.load_config_file(sys.argv[1])
for assignment in sys.argv[2:]:
  config_lib.apply_override(config, assignment)
print(config.data.seq_len)
EOF
)
lengths=$(for x in 1 4 16 64 256 1000; do printf '%s,' $((x * train_len)); done)

timed() {
  local start=$SECONDS
  "$@"
  echo "$3: $((SECONDS - start)) s wall" >&2
}

if [[ $phase != eval ]]; then
  timed "$python" -m drt_jax.train --config "$config" "${flags[@]}" --workdir "$run_dir" \
    ${STEPS_PER_RUN:+--steps_this_run "$STEPS_PER_RUN"}
fi
if [[ $phase != train ]]; then
  mkdir -p "$(dirname "$out")"
  # Segments of 16 training lengths keep the per-segment host work small against the GPU work.
  timed "$python" -m drt_jax.eval --task passkey --config "$config" "${flags[@]}" \
    --checkpoint "$run_dir" \
    --lengths "${lengths%,}" --samples 50,50,50,50,50,20 --depths 5 --batch "${BATCH:-10}" \
    --chunk_memory host --segment_len $((16 * train_len)) --out "$out"
fi
