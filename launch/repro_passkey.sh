#!/usr/bin/env bash
# The passkey length-generalisation reproduction on one GPU: train a small DRT on short sequences
# with passkey samples mixed in, in two phases (configs/passkey_repro.py on 1008-token samples, then
# configs/passkey_repro_long.py on 4032-token samples, started from the first phase's params), then
# evaluate passkey retrieval at 1x, 4x, 16x, 64x, 256x and 1000x the training length (the second
# phase's data.seq_len; 50 samples over 5 needle depths per length, 20 at 1000x), with the chunk
# memory in host memory. Writes bench/results/passkey_repro.json and its plots
# (passkey_repro_heatmap.png, passkey_repro_accuracy.png) and prints each phase's wall time.
#
#   launch/repro_passkey.sh [all|train|eval]      (default: all)
#
# Training resumes from each phase's newest checkpoint and a finished phase is skipped, so `train`
# can be run again after a crash; `eval` needs a finished second phase. Under a per-command time
# limit, start it in the background (setsid launch/repro_passkey.sh > log 2>&1 &) and poll the log.
# Environment:
#   PYTHON          interpreter (default: the repository's .venv/bin/python, else python3)
#   RUN_DIR         run folder; the phases train in RUN_DIR/short and RUN_DIR/long
#                   (default: runs/passkey_repro)
#   OUT             results JSON (default: bench/results/passkey_repro.json)
#   BATCH           sequences evaluated together (default: 10; host memory ~4 GB each at 1000x)
#   OVERRIDES       config fields for both phases and the evaluation, e.g. "model.topk=4"
#   LONG_OVERRIDES  config fields for the second phase and the evaluation only, e.g.
#                   "data.seq_len=8064 train.global_batch_size=8" (the training length follows)
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
run_dir=${RUN_DIR:-runs/passkey_repro}
out=${OUT:-bench/results/passkey_repro.json}
read -r -a short_overrides <<< "${OVERRIDES:-}"
read -r -a long_overrides <<< "${OVERRIDES:-} ${LONG_OVERRIDES:-}"
short_flags=("${short_overrides[@]/#/--config.}")
long_flags=("${long_overrides[@]/#/--config.}" "--config.train.init_from=$run_dir/short")
long_config=configs/passkey_repro_long.py
train_len=$("$python" - "$long_config" "${long_overrides[@]}" <<'PY'
import sys
from drt_jax import config as config_lib
config = config_lib.load_config_file(sys.argv[1])
for assignment in sys.argv[2:]:
  config_lib.apply_override(config, assignment)
print(config.data.seq_len)
PY
)
lengths=$(for x in 1 4 16 64 256 1000; do printf '%s,' $((x * train_len)); done)

timed() {
  local label=$1 start=$SECONDS
  shift
  "$@"
  echo "$label: $((SECONDS - start)) s wall" >&2
}

if [[ $phase != eval ]]; then
  timed "train phase 1 (configs/passkey_repro.py)" \
    "$python" -m drt_jax.train --config configs/passkey_repro.py "${short_flags[@]}" \
    --workdir "$run_dir/short"
  timed "train phase 2 ($long_config)" \
    "$python" -m drt_jax.train --config "$long_config" "${long_flags[@]}" --workdir "$run_dir/long"
fi
if [[ $phase != train ]]; then
  mkdir -p "$(dirname "$out")"
  # Segments of 16 training lengths keep the per-segment host work small against the GPU work.
  timed "evaluate" "$python" -m drt_jax.eval --task passkey --config "$long_config" \
    "${long_flags[@]}" --checkpoint "$run_dir/long" \
    --lengths "${lengths%,}" --samples 50,50,50,50,50,20 --depths 5 --batch "${BATCH:-10}" \
    --chunk_memory host --segment_len $((16 * train_len)) --out "$out"
fi
