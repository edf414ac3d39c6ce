#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension in place, run the CUDA tests, run the
# benchmarks. Logs and results go to $OUT (flat, for the device tool's file limits).
#   STAGES="build test ops decode" TEST_ARGS="-k topk" BENCH_ARGS="--quick" BUDGET_S=560
set -uo pipefail
OUT="${OUT:-/tmp/memops-gpu-out}"
STAGES="${STAGES:-build test ops decode}"
BUDGET_S="${BUDGET_S:-560}"
mkdir -p "$OUT"
start=$(date +%s)
export MEMOPS_BENCH_DEADLINE=$((start + BUDGET_S - 20))
export MEMOPS_BENCH_OUT="$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/memops-site .whl/*.whl
  export PYTHONPATH="/tmp/memops-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv > "$OUT/nvidia-smi.txt" 2>&1

if [[ " $STAGES " == *" build "* ]]; then
  t0=$(date +%s)
  if ! { cmake -S . -B build/dev -G Ninja -DMEMOPS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 &&
         cmake --build build/dev -j16; } > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"
    exit 1
  fi
  echo "build: $(( $(date +%s) - t0 )) s"
fi
if [[ " $STAGES " == *" test "* ]]; then
  t0=$(date +%s)
  # Error paths in a process of their own: a crash there must not hide the other results.
  timeout "${TEST_TIMEOUT_S:-300}" python3 -m pytest tests/test_cuda.py tests/test_hip_compile.py \
    -q -rs --tb=short -k "not errors" ${TEST_ARGS:-} > "$OUT/tests.log" 2>&1
  echo "tests: rc $? in $(( $(date +%s) - t0 )) s"
  timeout 120 python3 -m pytest tests/test_cuda.py -q -rs --tb=short -k errors >> "$OUT/tests.log" 2>&1
  echo "error-path tests: rc $?"
  grep -E "^(FAILED|ERROR)|passed|failed|Fatal|^E " "$OUT/tests.log" | head -40
fi
if [[ " $STAGES " == *" ops "* ]]; then
  python3 benchmarks/bench_ops.py ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench_ops rc $?"
fi
if [[ " $STAGES " == *" decode "* ]]; then
  python3 benchmarks/bench_decode.py ${BENCH_ARGS:-} >> "$OUT/bench.log" 2>&1
  echo "bench_decode rc $?"
fi
tail -c 6000 "$OUT/bench.log" 2>/dev/null
echo "total: $(( $(date +%s) - start )) s"
