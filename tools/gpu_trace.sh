#!/usr/bin/env bash
# One GPU call for the decode-speed work: build (tools/gpu_bench.sh's build stage, reused when the
# sources match), the GPU test files in $TESTS, then benchmarks/trace_e2e.py over $CELLS x $ROWS.
#   TESTS="tests/test_int8_summary.py tests/test_hf_static.py"   CELLS=8x32K,1x32K
#   ROWS=ours-compiled,ours-dense-compiled   BUDGET_S=540
set -uo pipefail
OUT="${OUT:-/tmp/memops-gpu-out}"
BUDGET_S="${BUDGET_S:-540}"
start=$(date +%s)
mkdir -p "$OUT"
BUDGET_S=$BUDGET_S STAGES=build bash tools/gpu_bench.sh | grep -E "^build|torch|Error|error" | head -5
cd /tmp/memops-src || exit 1
export PYTHONPATH=/tmp/memops-site:/tmp/memops-src PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/memops-inductor TORCHINDUCTOR_COMPILE_THREADS=16
if [ -n "${TESTS:-}" ]; then
  t0=$(date +%s)
  timeout 200 python3 -m pytest -q -p no:cacheprovider $TESTS > "$OUT/gpu_tests.log" 2>&1
  echo "GPU tests: rc $? $(grep -E '[0-9]+ (passed|failed)' "$OUT/gpu_tests.log" | tail -1) ($(( $(date +%s) - t0 )) s)"
  grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -10
fi
left=$(( BUDGET_S - ($(date +%s) - start) - 10 ))
MEMOPS_BENCH_DEADLINE=$(( $(date +%s) + left )) timeout "$left" python3 benchmarks/trace_e2e.py \
  --cells "${CELLS:-8x32K,1x32K}" --rows "${ROWS:-ours-compiled,ours-dense-compiled}" ${TRACE_ARGS:-} \
  --out "$OUT" > "$OUT/trace.log" 2> "$OUT/trace.err"
echo "trace_e2e: rc $?"
grep -v "^USDT" "$OUT/trace.log" | sed -n '/^| cell/,$p' | head -60
echo "total $(( $(date +%s) - start )) s"
