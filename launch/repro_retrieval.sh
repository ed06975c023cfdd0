#!/usr/bin/env bash
# Learned retrieval vs random retrieval vs learned without Gumbel noise (issue 14; paper: perplexity
# 14.05 vs 14.53 vs 14.36): configs/passkey_repro.py (1008-token pystdlib samples, half of them
# passkey samples) for 4,000 steps, 2 seeds each; held-out perplexity over the same last 504
# tokens of each window at 1x, 4x and 16x the training length, and passkey accuracy at 1x to 64x;
# compare into bench/results/repro_retrieval/ and bench/results/repro_retrieval.json.
#
#   launch/repro_retrieval.sh           # on the GPU
#   TINY=1 launch/repro_retrieval.sh    # a CPU check of the pipeline
#
# Budget (one H200, 20 minutes): 6 runs of 4,000 steps of 64 x 1008 tokens; 12,000 such steps
# took 259 s on an H100 (docs/benchmarks.md): ~86 s per run + ~25 s start-up: ~11 min. Evaluation
# per run: perplexity (16 windows x 3 lengths, ~10 s) and passkey at 1x..64x (20 samples per
# length; 64x = 64K tokens, ~30 s): ~4 min in all.
NAME=retrieval
CONFIG=configs/passkey_repro.py
SEEDS_DEFAULT=0,1
VARIANT_ORDER=(learned random nogumbel)
declare -A VARIANTS_ALL=(
  [learned]="model.retrieval=learned"
  [random]="model.retrieval=random"
  [nogumbel]="model.gumbel=False"
)
[[ -n ${STEPS:-} ]] || STEPS=4000
source "$(dirname "${BASH_SOURCE[0]}")/repro_lib.sh"

evaluate_run() {  # RUN TRAIN_LEN LABEL
  local ppl=(1 4 16) passkey=(1 4 16 64) scored=504
  [[ $tiny == 1 ]] && { passkey=(1 4); scored=100; }
  eval_into "$1" ppl --task ppl --lengths "$(lengths "$2" "${ppl[@]}")" --scored "$scored" \
    --windows 16
  eval_into "$1" passkey --task passkey --lengths "$(lengths "$2" "${passkey[@]}")" \
    --samples 20 --depths 5 --batch 10 --chunk_memory host
}

run_experiment
