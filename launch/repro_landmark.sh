#!/usr/bin/env bash
# Passkey retrieval of Landmark Attention vs DRT from 1x to 256x the training length (issue 14;
# paper: Landmark 96-99% up to 32K and 0% from 64K, DRT 98-100% up to 16M): configs/passkey_repro.py
# (1008-token pystdlib samples, half of them passkey samples, 12,000 steps: the passkey
# reproduction's first phase) as DRT and as Landmark Attention; passkey at 1x, 4x, 16x, 64x and 256x
# (up to 258K tokens), 50 samples over 5 depths per length; compare into
# bench/results/repro_landmark/ and bench/results/repro_landmark.json.
#
#   launch/repro_landmark.sh            # on the GPU
#   TINY=1 launch/repro_landmark.sh     # a CPU check of the pipeline
#
# Budget (one H200, 20 minutes): DRT trains in ~260 s (docs/benchmarks.md: 259 s on an H100) plus
# ~30 s start-up; Landmark (XLA, every block attended in training) perhaps 2x: ~10 min of training.
# Evaluation ~1 min per run at these lengths (the passkey reproduction's walls), ~1 min for
# Landmark's top-k block decoding if it is as fast: ~13 min in all. One seed: the paper's
# difference is 0% vs 100%.
NAME=landmark
CONFIG=configs/passkey_repro.py
SEEDS_DEFAULT=0
VARIANT_ORDER=(drt landmark)
declare -A VARIANTS_ALL=(
  [drt]="model.decoder_layers=(2,2)"
  [landmark]="model.arch=landmark model.impl=xla model.decoder_layers=(4,) model.topk=4"
)
source "$(dirname "${BASH_SOURCE[0]}")/repro_lib.sh"

evaluate_run() { task_eval passkey "$@"; }  # RUN TRAIN_LEN LABEL

run_experiment
