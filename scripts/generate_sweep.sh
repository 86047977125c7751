#!/usr/bin/env bash
# The whole-model sweep of benchmarks/generate.py on the GPU machine, in parts that each fit one
# device call (10 minutes): run as a benchmark command of gpu_check.sh, e.g.
#   bash scripts/gpu_check.sh -- "bash scripts/generate_sweep.sh 1"
# Needs local/traces/{synthetic-qwen3-skewed,synthetic-mixtral}.npz (carry local/). Each run is
# its own process and is skipped when the JSON has it, so a part cut short resumes next time.
set -u
out=${GENERATE_JSON:-benchmarks/results/h200/generate.json}
q="python3 benchmarks/generate.py --model-shape qwen3-30b-a3b --out $out"
m="python3 benchmarks/generate.py --model-shape mixtral-8x7b --out $out"
qt="--trace local/traces/synthetic-qwen3-skewed.npz"
mt="--trace local/traces/synthetic-mixtral.npz"
run() { local limit=$1; shift; echo "== $*"; timeout "$limit" "$@" 2>&1 | grep -v -i warn | tail -25; }
case "${1:?part 1, 2, 3 or 4}" in
  1)  # Qwen3 shape, batch 1: budgets, trace routing, prefill of a 512-token prompt
    run 200 $q --budgets 100,50 --batches 1 --methods moe-uvm,uva --timeout 190
    run 120 $q --budgets 50 --batches 1 --methods moe-uvm,uva --trace uniform --timeout 110
    run 150 $q --budgets 50 --batches 1 --methods moe-uvm,uva $qt --timeout 140
    run 100 $q --budgets 50 --batches 1 --methods moe-uvm --prompt-tokens 512 --new-tokens 16 --timeout 95
    run 100 $q --budgets 25,75 --batches 1 --methods moe-uvm --timeout 95 ;;
  2)  # Qwen3 shape: batch 16, and the rest of batch 1
    run 250 $q --budgets 100,50,25 --batches 16 --methods moe-uvm --timeout 120
    run 100 $q --budgets 50 --batches 16 --methods uva --timeout 95
    run 150 $q --budgets 25,75 --batches 1 --methods moe-uvm,uva $qt --timeout 70
    run 60 $q --budgets 100 --batches 16 --methods hf-eager --timeout 55 ;;
  3)  # Mixtral-8x7B shape
    run 200 $m --budgets 100,50 --batches 1 --methods moe-uvm,uva --timeout 120
    run 120 $m --budgets 50 --batches 1 --methods moe-uvm,uva $mt --timeout 110
    run 120 $m --budgets 50 --batches 1 --methods moe-uvm,uva --trace uniform --timeout 110
    run 120 $m --budgets 100 --batches 1 --methods hf-eager --timeout 110
    run 100 $m --budgets 50 --batches 16 --methods moe-uvm --timeout 95 ;;
  4)  # what is left: other budgets and batches of both shapes
    run 280 $q --budgets 25,50,75,100 --batches 1,16 --methods moe-uvm,uva --timeout 120
    run 280 $m --budgets 25,50,75,100 --batches 1,16 --methods moe-uvm,uva --timeout 120 ;;
esac
python3 benchmarks/generate.py --table --out "$out"
