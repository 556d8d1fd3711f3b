#!/usr/bin/env bash
# GPU checks on a machine with a CUDA device and the package's dependencies importable:
# the CUDA tests, device-to-host copy costs, and the stall benchmark on the device.
#   bash scripts/gpu_check.sh [--all-peers] [OUT_DIR]      (default benchmarks/results/gpu)
# The stall runs compare AsymCheck with DCP-best thread (about 5 minutes for the whole script);
# --all-peers adds every other peer (the every-1 run alone then takes over 3 minutes).
# Each step has its own time limit, so one slow step does not hide the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
methods=(--methods "no checkpoint,asymcheck asym,asymcheck naive,DCP-best thread")
limits=(150 100)
if [[ "${1:-}" == --all-peers ]]; then
  methods=()
  limits=(300 200)
  shift
fi
out="${1:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else
  "scripts/gpu_check.sh needs a CUDA device")' || exit 2
nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
status=0
step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2; shift 2
  echo "=== $name"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [[ $rc == 0 ]] || status=1
}
step 150 tests python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/test_cuda.py \
  tests/test_snapshot.py tests/test_integration_deepspeed.py
step 45 d2h python3 benchmarks/d2h.py --mib 1024 --out "$out/d2h.json"
# GPT-2 6x768, vocab 16384, batch 64: 663 MB of state. Every iteration, AsymCheck sends every
# 20th save to the disk (no disk takes 663 MB per iteration); every 10, each save goes to disk.
model=(--device cuda --layers 6 --width 768 --vocab 16384 --batch 64)
step "${limits[0]}" stall-cuda-every1 python3 benchmarks/stall.py "${model[@]}" "${methods[@]}" \
  --every 1 --iterations 15 --local-every 20 --out "$out/stall-cuda-every1.json"
step "${limits[1]}" stall-cuda-every10 python3 benchmarks/stall.py "${model[@]}" "${methods[@]}" \
  --every 10 --iterations 30 --out "$out/stall-cuda-every10.json"
exit $status
