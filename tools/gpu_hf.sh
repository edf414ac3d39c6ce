#!/usr/bin/env bash
# One call on the GPU machine: build the CUDA extension, run tools/gpu_hf_check.py (graph-captured
# and compiled generate() tokens vs eager tokens with the static MemopsCache, no device-to-host
# sync in a decode step, per-token decode times), then the static-cache CPU tests on the GPU
# machine's transformers. Logs and JSON flat under $OUT; a short table last. BUILD=0 skips the build.
set -uo pipefail
OUT="${OUT:-/tmp/memops-gpu-out}"
export OUT
mkdir -p "$OUT"
start=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.txt" 2>&1
if [ "${BUILD:-1}" = 1 ]; then
  if ! { cmake -S . -B build/dev -G Ninja -DMEMOPS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 &&
         cmake --build build/dev -j16; } > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; exit 1
  fi
  echo "build: $(( $(date +%s) - start )) s"
fi
t0=$(date +%s)
(cd tests && timeout 150 python3 -m pytest -q -rs -p no:cacheprovider test_hf_static.py) > "$OUT/tests_hf_static.log" 2>&1
echo "tests/test_hf_static.py: rc $? in $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_hf_static.log" | head -10
t0=$(date +%s)
timeout 330 python3 tools/gpu_hf_check.py > "$OUT/gpu_hf.log" 2>&1
rc=$?
echo "gpu_hf_check: rc $rc in $(( $(date +%s) - t0 )) s (total $(( $(date +%s) - start )) s)"
tail -16 "$OUT/gpu_hf.log"
exit $rc
