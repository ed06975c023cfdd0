#!/usr/bin/env bash
# Multi-hop retrieval needs more than one retrieval group (issue 14; paper: 2-hop NIAH 88.5% with 2
# groups vs 41.1% with 1 at 1K, 79.4% vs 34.3% at 4M; Landmark 90.8% at 1K, 0% from 64K):
# configs/repro_multihop.py trained with 1 and 2 retrieval groups and as Landmark Attention, then
# 2-hop accuracy (exact match of both hops' values) at 1x, 4x, 16x, 64x and 256x the training
# length (1008 tokens: up to 258K), 50 samples over 5 depths per length, chunk memory in host
# memory; compare into bench/results/repro_multihop/ and bench/results/repro_multihop.json.
#
#   launch/repro_multihop.sh            # on the GPU
#   TINY=1 launch/repro_multihop.sh     # a CPU check of the pipeline
#
# Budget (one H200, 20 minutes): 3 runs of 6,000 steps of 64 x 1008 tokens. configs/passkey_repro.py
# (the same model) trained 12,000 such steps in 259 s on an H100 (docs/benchmarks.md): ~130 s per
# DRT run plus ~30 s start-up, Landmark (XLA) perhaps twice that: ~10 min of training. Evaluation:
# the passkey reproduction's walls at 1x..256x of 4032 tokens were 17 + 11 + 14 + 34 + 64 s; here
# the longest is 258K tokens, ~1 min per run: ~3 min. One seed (the paper's gap is 2x); SEEDS=0,1
# for two if the first leaves room (~+8 min).
NAME=multihop
CONFIG=configs/repro_multihop.py
SEEDS_DEFAULT=0
VARIANT_ORDER=(drt1 drt2 landmark)
declare -A VARIANTS_ALL=(
  [drt1]="model.decoder_layers=(2,2)"
  [drt2]="model.decoder_layers=(2,1,1)"
  [landmark]="model.arch=landmark model.impl=xla model.decoder_layers=(4,) model.topk=4"
)
source "$(dirname "${BASH_SOURCE[0]}")/repro_lib.sh"

evaluate_run() { task_eval multihop "$@"; }  # RUN TRAIN_LEN LABEL

run_experiment
