#!/usr/bin/env bash
# The passkey length-generalisation reproduction on one GPU: train a small DRT on short sequences
# with passkey samples mixed in, in two phases (configs/passkey_repro.py on 1008-token samples, then
# configs/passkey_repro_long.py on 4032-token samples, started from the first phase's params), then
# evaluate passkey retrieval at 1x, 4x, 16x, 64x, 256x and 1000x the training length (the second
# phase's data.seq_len; 50 samples over 5 needle depths per length, 20 at 1000x), with the chunk
# memory in host memory. Writes bench/results/passkey_repro.json and its plots
# (passkey_repro_heatmap.png, passkey_repro_accuracy.png) and prints each phase's wall time.
#
#   launch/repro_passkey.sh [all|train|eval|offsets]      (default: all)
#
# `eval` answers with prompt-end retrieval (the default of drt_jax.eval since issue 18) at
# --question_offset 1, the aligned layout of the results so far; NOPROMPT_END=1 adds
# --noprompt_end_retrieval (the one-shot forward's decoding, as those results were measured).
# It writes OUT (default: over the recorded bench/results/passkey_repro.json; set OUT to keep it).
# `offsets` (issue 18) evaluates the finished run with the question ending at every offset
# 0 .. chunk_len - 1 of its chunk (--question_offset all: sample i at offset i mod chunk_len, so
# every offset gets the same number of samples), for each task of TASKS at each multiple of
# MULTIPLES, writing bench/results/passkey_repro_offsets_<task>_<multiples>.json (OUT_DIR) with
# accuracy by offset and its plots (<stem>_offset.png: accuracy by offset, a line per length).
# Samples per length: SAMPLES_PER_OFFSET x chunk_len at up to 16x (default 10 x 63 = 630), one per
# offset beyond (63), 5 depths.
# GPU time. Measured on an H200 (2026-12-04, SAMPLES_PER_OFFSET=1, 65 samples per length, each
# prompt prefilled alone, before Session.prefill took prompts of different lengths together):
# 54 s at 1x (mostly compilation) and 32 s at 16x, per task. A batch now prefills its prompts
# together, so the walls should approach the aligned evaluation's per sample (64 s for 20 samples
# at 256x, 115 s for 20 at 1000x, batch 10): not yet measured. Training from scratch adds
# 245 + 93 s (H200).
# A command of the device is limited to 10 minutes: run it in pieces, e.g.
#   TASKS=passkey MULTIPLES="1 16 256" launch/repro_passkey.sh offsets
#   TASKS=passkey MULTIPLES=1000 launch/repro_passkey.sh offsets
# (and the same for multikey), or in the background (setsid ... &) and poll the log.
# NOPROMPT_END=1 measures the same without prompt-end retrieval (files ..._noprompt_end_...).
# Multikey is not in this model's training mix (data.tasks="passkey"). A model meant to answer it
# is retrained with OVERRIDES="data.tasks=passkey,multikey", which puts it in both phases. With it in
# phase 2 only (LONG_OVERRIDES), two runs of the same command on an H200 ended at 94% and 6%
# teacher-forced multikey accuracy (docs/benchmarks.md).
# With 10 samples per offset a length's 630 samples bound its accuracy, not each offset's to 1%.
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
#   TASKS           offsets: tasks to evaluate (default: "passkey multikey")
#   MULTIPLES       offsets: multiples of the training length (default: "1 16 256 1000")
#   SAMPLES_PER_OFFSET  offsets: samples per offset at up to 16x (default: 10; 1 beyond)
#   OUT_DIR         offsets: results folder (default: bench/results)
#   NOPROMPT_END    1: evaluate with --noprompt_end_retrieval (default: 0)
set -euo pipefail

phase=${1:-all}
if [[ ! $phase =~ ^(all|train|eval|offsets)$ ]]; then
  echo "usage: $0 [all|train|eval|offsets]" >&2
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
read -r train_len chunk_len < <("$python" - "$long_config" "${long_overrides[@]}" <<'PY'
import sys
from drt_jax import config as config_lib
config = config_lib.load_config_file(sys.argv[1])
for assignment in sys.argv[2:]:
  config_lib.apply_override(config, assignment)
print(config.data.seq_len, config.model.chunk_len)
PY
)
lengths=$(for x in 1 4 16 64 256 1000; do printf '%s,' $((x * train_len)); done)
prompt_end=()
suffix=
if [[ ${NOPROMPT_END:-0} == 1 ]]; then
  prompt_end=(--noprompt_end_retrieval)
  suffix=_noprompt_end
fi

timed() {
  local label=$1 start=$SECONDS
  shift
  "$@"
  echo "$label: $((SECONDS - start)) s wall" >&2
}

if [[ $phase == all || $phase == train ]]; then
  timed "train phase 1 (configs/passkey_repro.py)" \
    "$python" -m drt_jax.train --config configs/passkey_repro.py "${short_flags[@]}" \
    --workdir "$run_dir/short"
  timed "train phase 2 ($long_config)" \
    "$python" -m drt_jax.train --config "$long_config" "${long_flags[@]}" --workdir "$run_dir/long"
fi
if [[ $phase == all || $phase == eval ]]; then
  mkdir -p "$(dirname "$out")"
  # Segments of 16 training lengths keep the per-segment host work small against the GPU work.
  timed "evaluate" "$python" -m drt_jax.eval --task passkey --config "$long_config" \
    "${long_flags[@]}" --checkpoint "$run_dir/long" \
    --lengths "${lengths%,}" --samples 50,50,50,50,50,20 --depths 5 --batch "${BATCH:-10}" \
    --chunk_memory host --segment_len $((16 * train_len)) "${prompt_end[@]}" --out "$out"
fi
if [[ $phase == offsets ]]; then
  out_dir=${OUT_DIR:-bench/results}
  mkdir -p "$out_dir"
  read -r -a multiples <<< "${MULTIPLES:-1 16 256 1000}"
  offset_lengths= offset_samples=
  for x in "${multiples[@]}"; do
    offset_lengths+=$((x * train_len)),
    offset_samples+=$(( (x <= 16 ? ${SAMPLES_PER_OFFSET:-10} : 1) * chunk_len )),
  done
  stem_multiples=$(IFS=_; echo "${multiples[*]}")
  for task in ${TASKS:-passkey multikey}; do
    timed "evaluate $task by question offset at ${multiples[*]}x" "$python" -m drt_jax.eval \
      --task "$task" --config "$long_config" "${long_flags[@]}" --checkpoint "$run_dir/long" \
      --lengths "${offset_lengths%,}" --samples "${offset_samples%,}" --depths 5 \
      --question_offset all --batch "${BATCH:-10}" --chunk_memory host \
      --segment_len $((16 * train_len)) "${prompt_end[@]}" \
      --out "$out_dir/passkey_repro_offsets${suffix}_${task}_${stem_multiples}x.json"
  done
fi
