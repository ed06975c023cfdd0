#!/usr/bin/env bash
# Perplexity at equal training tokens (issue 14, the paper's Table 2 at small scale): DRT with 1 and
# 2 retrieval groups, the sliding-window baseline and it with 2 more layers, Landmark Attention and
# full attention (configs/repro_lm.py), 2 seeds each; held-out perplexity over the same last 1008
# tokens of each window at 1x, 4x and 16x the training length (full attention at 1x only: it
# has no use of longer windows), then compare (table, plots) into bench/results/repro_ppl/ and
# bench/results/repro_ppl.json. One command; resumable (a finished run or eval is skipped).
#
#   launch/repro_ppl.sh                 # on the GPU
#   TINY=1 launch/repro_ppl.sh          # a CPU check of the pipeline (tiny model, 4 steps)
#   VARIANTS="drt1 swa" SEEDS=0 STEPS=500 launch/repro_ppl.sh
#
# Budget (one H200, 20 minutes): 12 runs of 2,500 steps of 16 x 2016 tokens. From
# docs/benchmarks.md, configs/passkey_repro.py (d 256, 4 layers, k 8, Pallas) trained 12,000 steps
# of 64 x 1008 tokens in 259 s on an H100: ~3.0M tokens/s. With 6 layers (1.5x the layer FLOPs)
# ~2M tokens/s, so 2,500 x 32K tokens ~ 40 s per run, plus ~25 s of start-up and compilation
# (seeds share the compilation cache): ~13 min of training. Evaluation: 16 windows x 3 lengths
# per run (up to 32K tokens each; a compilation per length dominates, ~20-30 s per run): ~5 min.
# ~18 min in all, close to the limit: Landmark (XLA, attention over all blocks in training) and
# the 2-group DRT are slower than the estimate. If the first runs' step time (step_time_s in
# RUN/metrics.jsonl) says it will not fit, lower STEPS (e.g. STEPS=2000) or run the variants in
# two calls (VARIANTS="drt1 drt2 swa", then VARIANTS="swa2 landmark full"; finished runs skip).
NAME=ppl
CONFIG=configs/repro_lm.py
SEEDS_DEFAULT=0,1
VARIANT_ORDER=(drt1 drt2 swa swa2 landmark full)
declare -A VARIANTS_ALL=(
  [drt1]="model.decoder_layers=(3,3)"
  [drt2]="model.decoder_layers=(2,2,2)"
  [swa]="model.arch=swa model.decoder_layers=(6,)"
  [swa2]="model.arch=swa model.decoder_layers=(8,)"
  [landmark]="model.arch=landmark model.impl=xla model.decoder_layers=(6,) model.topk=4"
  [full]="model.arch=full model.impl=xla model.use_alibi=False model.decoder_layers=(6,)"
)
source "$(dirname "${BASH_SOURCE[0]}")/repro_lib.sh"

evaluate_run() {  # RUN TRAIN_LEN LABEL
  local multiples=(1 4 16) scored=1008
  [[ $3 == full_* ]] && multiples=(1)
  [[ $tiny == 1 ]] && scored=100
  eval_into "$1" ppl --task ppl --lengths "$(lengths "$2" "${multiples[@]}")" --scored "$scored" \
    --windows 16
}

run_experiment
