# Shared by launch/repro_{ppl,multihop,retrieval,landmark}.sh (sourced, not run): train the
# variants of one experiment with drt_jax.sweep, evaluate every run into RUN/eval/, copy each run's
# record (metrics.jsonl, config.json, overrides.txt, eval/; no checkpoints) to
# bench/results/repro_<name>/runs/<run>, and compare every record there (those of variants run
# earlier too) into bench/results/repro_<name>/ and bench/results/repro_<name>.json, printing wall
# times.
#
# The script sets NAME, CONFIG, VARIANTS_ALL (an associative array label -> fields), SEEDS_DEFAULT
# and defines evaluate_run RUN TRAIN_LEN (the evals of one run, through eval_into). Environment:
#   PYTHON     interpreter (default: the repository's .venv/bin/python, else python3)
#   RUNS_DIR   where the sweep's folder goes (default: runs); the runs are RUNS_DIR/repro_<name>/*
#   OUT_DIR    results folder (default: bench/results); RESULTS (default: OUT_DIR/repro_<name>.json)
#   VARIANTS   space-separated labels to run (default: all of the experiment's)
#   SEEDS      comma-separated seeds (default: the experiment's)
#   STEPS      train.num_train_steps of every run (default: the config's)
#   SETS       more space-separated field=value for every run
#   TINY=1     a CPU check of the whole pipeline: a tiny model, 4 steps, pydoc, small evals
#              (results go to RUNS_DIR/repro_<name>_tiny and OUT_DIR/repro_<name>_tiny*)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
python=${PYTHON:-$repo/.venv/bin/python}
[[ -x $python ]] || python=python3
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$repo/.cache/jax}
tiny=${TINY:-0}
sweep_name=repro_$NAME$([[ $tiny == 1 ]] && echo _tiny || true)
runs_dir=${RUNS_DIR:-runs}
out_dir=${OUT_DIR:-bench/results}
results=${RESULTS:-$out_dir/$sweep_name.json}
read -r -a sets <<< "${SETS:-}"
[[ -n ${STEPS:-} ]] && sets+=("train.num_train_steps=$STEPS")
if [[ $tiny == 1 ]]; then
  # Applied before the variants' fields (drt_jax.sweep's order), so layer counts stay theirs.
  sets+=(model.d_model=32 model.num_heads=2 model.num_kv_heads=2 model.mlp_dim=64
         model.encoder_layers=1 model.chunk_len=15 model.window=32 model.impl=xla model.dtype=float32
         data.source=pydoc data.seq_len=240 train.global_batch_size=2 train.num_train_steps=4
         train.warmup_steps=1 train.log_every=1 train.eval_every=4 train.eval_batches=1
         train.checkpoint_every=4)
fi
variant_labels=${VARIANTS:-${VARIANT_ORDER[*]}}

timed() {
  local label=$1 start=$SECONDS
  shift
  "$@"
  echo "== $label: $((SECONDS - start)) s wall" >&2
}

# eval_into RUN FILE_STEM ARGS...: drt_jax.eval on RUN's checkpoint and config (the sweep's
# overrides.txt), writing RUN/eval/FILE_STEM.json; skipped when that file exists.
eval_into() {
  local run=$1 stem=$2
  shift 2
  local out=$run/eval/$stem.json
  if [[ -f $out ]]; then
    echo "$out exists, skipped" >&2
    return
  fi
  mkdir -p "$run/eval"
  local -a overrides
  mapfile -t overrides < "$run/overrides.txt"
  [[ $tiny == 1 ]] && set -- "$@" --samples 2 --depths 2 --windows 2 --batch 2
  timed "eval $stem $(basename "$run")" "$python" -m drt_jax.eval --config "$CONFIG" \
    "${overrides[@]}" --checkpoint "$run" --out "$out" "$@"
}

# task_eval TASK RUN TRAIN_LEN LABEL: TASK at 1x .. 256x the training length (1x, 4x with TINY),
# 50 samples over 5 depths, chunk memory on the host where the architecture keeps chunks (DRT;
# landmark keeps its blocks on the device).
task_eval() {
  local task=$1 multiples=(1 4 16 64 256) memory=(--chunk_memory host)
  [[ $tiny == 1 ]] && multiples=(1 4)
  [[ $4 == landmark* ]] && memory=()
  eval_into "$2" "$task" --task "$task" --lengths "$(lengths "$3" "${multiples[@]}")" \
    --samples 50 --depths 5 --batch 10 "${memory[@]}"
}

# lengths TRAIN_LEN MULTIPLES...: "L*m1,L*m2,..."
lengths() {
  local train_len=$1 out=
  shift
  for m in "$@"; do out+=$((m * train_len)),; done
  echo "${out%,}"
}

run_experiment() {
  local total=$SECONDS
  local -a args=(--config "$CONFIG" --name "$sweep_name" --runs_dir "$runs_dir"
                 --grid "seed=${SEEDS:-$SEEDS_DEFAULT}")
  for label in $variant_labels; do
    [[ -n ${VARIANTS_ALL[$label]+x} ]] || { echo "error: VARIANTS: unknown '$label' (known: ${VARIANT_ORDER[*]})" >&2; exit 2; }
    args+=(--variant "$label: ${VARIANTS_ALL[$label]}")
  done
  for s in "${sets[@]}"; do args+=(--set "$s"); done
  "$python" -m drt_jax.sweep "${args[@]}" --dry_run
  timed "train (sweep $sweep_name)" "$python" -m drt_jax.sweep "${args[@]}"
  local -a runs=()
  for label in $variant_labels; do
    for run in "$runs_dir/$sweep_name/${label}_seed="*/; do runs+=("${run%/}"); done
  done
  for run in "${runs[@]}"; do
    local train_len
    train_len=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["data"]["seq_len"])' "$run/config.json")
    evaluate_run "$run" "$train_len" "$(basename "$run")"
  done
  # Each run's record (no checkpoints) is kept under the results, so that variants trained in
  # another call or on another machine (VARIANTS=...) join the same comparison.
  local records=$out_dir/$sweep_name/runs
  mkdir -p "$records"
  for run in "${runs[@]}"; do
    local record=$records/$(basename "$run")
    rm -rf "$record" && mkdir -p "$record"
    cp -r "$run"/{metrics.jsonl,config.json,overrides.txt,eval} "$record"/
  done
  timed "compare" "$python" -m drt_jax.compare "$records"/*/ --out "$out_dir/$sweep_name"
  cp "$out_dir/$sweep_name/compare.json" "$results"
  echo "== $sweep_name: $((SECONDS - total)) s wall in all; table $out_dir/$sweep_name/compare.md, plots beside it, $results" >&2
}
