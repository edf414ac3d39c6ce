#!/usr/bin/env bash
# int8 summaries on one GPU: build the CUDA extension in place, run the int8 CUDA tests, and
# time topk_relevancy on a bf16 summary against an int8 one (Llama-3-8B decode shape: B 8,
# Hq 32, Hkv 8, D 128, page 16, 32K tokens = 2048 pages, budget 2048 tokens = 128 pages).
# Logs and JSON go flat under $OUT; the table is printed last. About 5 minutes with the build.
set -uo pipefail
OUT="${OUT:-/tmp/memops-int8-out}"
mkdir -p "$OUT"
start=$(date +%s)
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/memops-site .whl/*.whl
  export PYTHONPATH="/tmp/memops-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
if ! { cmake -S . -B build/dev -G Ninja -DMEMOPS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 &&
       cmake --build build/dev -j16; } > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
t0=$(date +%s)
timeout 240 python3 -m pytest tests/test_cuda.py tests/test_int8_summary.py -q -rs --tb=short \
  -k "int8 or test_int8_summary" > "$OUT/tests.log" 2>&1
echo "tests: rc $? in $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed|Fatal|^E " "$OUT/tests.log" | head -40
timeout 120 python3 benchmarks/bench_int8.py "$OUT" 2>&1 | tee "$OUT/timing.log"
echo "total: $(( $(date +%s) - start )) s"
