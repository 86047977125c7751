#!/usr/bin/env bash
# The whole-model sweep of benchmarks/generate.py on the GPU machine, in parts that each fit one
# device call (10 minutes): run as a benchmark command of gpu_check.sh, e.g.
#   bash scripts/gpu_check.sh -- "bash scripts/generate_sweep.sh 1"
# Needs local/traces/{synthetic-qwen3-skewed,synthetic-mixtral}.npz (carry local/). Each run is
# its own process and is skipped when the JSON has it, so a part cut short resumes next time.
# Each device call starts from this checkout's JSON: unpack the call's results.tgz here before
# the next call, or the next call's JSON will lack this one's records.
set -u
out=${GENERATE_JSON:-benchmarks/results/h200/generate.json}
q="python3 benchmarks/generate.py --model-shape qwen3-30b-a3b --out $out"
m="python3 benchmarks/generate.py --model-shape mixtral-8x7b --out $out"
qt="--trace local/traces/synthetic-qwen3-skewed.npz"
mt="--trace local/traces/synthetic-mixtral.npz"
run() { local limit=$1; shift; echo "== $*"; timeout "$limit" "$@" 2>&1 | grep -v -i warn | tail -25; }
case "${1:?part 1 to 5}" in
  # Parts 1-3 fit the 600 s a device call has; 4 and 5 take two calls or more (run them again:
  # finished runs are skipped). The first run of a model shape, batch size and cache length in
  # a machine compiles the decode step: ~2 minutes at full depth.
  1)  # Qwen3 shape, batch 1: all experts and half in budget; uniform and skewed trace routing
    run 240 $q --budgets 100,50 --batches 1 --methods moe-uvm --timeout 200
    run 230 $q --budgets 50 --batches 1 --methods moe-uvm,uva --trace uniform --timeout 110
    run 230 $q --budgets 50 --batches 1 --methods moe-uvm,uva $qt --timeout 110 ;;
  2)  # Qwen3 shape: 512-token prefill (a new cache length compiles again), batch 16
    run 240 $q --budgets 50 --batches 1 --methods moe-uvm --prompt-tokens 512 --new-tokens 16 --timeout 225
    run 120 $q --budgets 50 --batches 1 --methods moe-uvm --prompt-tokens 512 --new-tokens 16 --trace uniform --timeout 115
    run 200 $q --budgets 100,50 --batches 16 --methods moe-uvm --timeout 200 ;;
  3)  # Mixtral-8x7B shape, batch 1
    run 240 $m --budgets 100,50 --batches 1 --methods moe-uvm --timeout 200
    run 230 $m --budgets 50 --batches 1 --methods moe-uvm,uva --trace uniform --timeout 110
    run 230 $m --budgets 50 --batches 1 --methods moe-uvm,uva $mt --timeout 110 ;;
  4)  # baselines and the other budgets
    run 240 $m --budgets 100,50 --batches 1 --methods hf-eager,hf-static,accelerate --timeout 115
    run 230 $q --budgets 100,50 --batches 1 --methods uva --timeout 110
    run 230 $q --budgets 25,75 --batches 1 --methods moe-uvm --timeout 110
    run 230 $q --budgets 50,100 --batches 16 --methods uva,hf-eager --timeout 110 ;;
  5)  # everything else of both shapes
    run 260 $q --budgets 25,50,75,100 --batches 1,16 --methods moe-uvm,uva --timeout 120
    run 260 $m --budgets 25,50,75,100 --batches 1,16 --methods moe-uvm,uva --timeout 120 ;;
esac
python3 benchmarks/generate.py --table --out "$out"
