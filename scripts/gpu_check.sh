#!/usr/bin/env bash
# Everything the GPU machine runs for a check: install over the preinstalled torch/triton/
# cuda-bindings (no package index there), the gpu-marked tests, then the named benchmarks.
# Usage: [TEST_TIMEOUT=s] bash scripts/gpu_check.sh [pytest args...] -- [benchmark commands, one per argument]
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
stamp=$(mktemp)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1 || { cat "$out/pip.log"; exit 1; }
python3 -c "import torch, triton, cuda.bindings as b; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda-bindings', b.__version__, torch.cuda.get_device_name(0))"
moe-uvm info
tests=(); benches=(); seen=0
for a in "$@"; do
  if [ "$a" = "--" ]; then seen=1; continue; fi
  if [ $seen = 0 ]; then tests+=("$a"); else benches+=("$a"); fi
done
status=0
if [ ${#tests[@]} -gt 0 ]; then
  timeout "${TEST_TIMEOUT:-1200}" python3 -m pytest -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$out/pytest.log" | tail -40
  status=${PIPESTATUS[0]}
fi
for b in "${benches[@]}"; do
  echo "== $b"
  bash -c "$b" 2>&1 | tee -a "$out/bench.log" | tail -40
done
# only what this run wrote comes back, as one archive (the transfer takes at most 8 files,
# two folders deep): unpack it in the checkout with `tar xzf results.tgz`
find benchmarks/results moe-uvm-results moe_uvm/kernels/configs -type f -newer "$stamp" 2>/dev/null >"$out/new_files.txt"
[ -s "$out/new_files.txt" ] && tar czf "$out/results.tgz" -T "$out/new_files.txt"
exit $status
