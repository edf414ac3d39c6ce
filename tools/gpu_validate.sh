#!/usr/bin/env bash
# The validation call on the GPU machine after a merge, within one device-tool command:
#   1. tools/gpu_safety.sh: CUDA build with the image's own compiler settings (no LD_PRELOAD),
#      the error probes, every error path in a subprocess, tests/test_cuda.py, memcheck;
#   2. the static-cache and HF tests on the image's transformers, from that build;
#   3. benchmarks/bench_int8.py (bf16 vs int8 scoring);
#   4. tools/gpu_bench.sh: the end-to-end generate() table (reusing that build), then the
#      decode-step table with FlashInfer if time is left.
# SAFETY_S, E2E_CELLS, E2E_ROWS, BUDGET_S as the called scripts take them. Output flat under $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/memops-gpu-out}"
export OUT
BUDGET_S="${BUDGET_S:-560}"
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
mkdir -p "$OUT"
BUDGET_S="${SAFETY_S:-290}" bash tools/gpu_safety.sh 2>&1 | tail -14

build=/tmp/memops-safety
t0=$(date +%s)
(cd "$build" && PYTHONPATH="$build" timeout 60 python3 -m pytest -q -p no:cacheprovider \
   tests/test_hf_static.py tests/test_hf.py > "$OUT/tests_hf.log" 2>&1)
echo "HF tests on the GPU machine: rc $? $(grep -E '[0-9]+ (passed|failed)' "$OUT/tests_hf.log" | tail -1) ($(( $(date +%s) - t0 )) s)"

(cd "$build" && PYTHONPATH="$build" timeout 60 python3 benchmarks/bench_int8.py "$OUT" > "$OUT/int8_timing.log" 2>&1)
echo "bench_int8: rc $?"; tail -5 "$OUT/int8_timing.log"

# Hand the build to gpu_bench.sh: same sources, same stamp, so it is reused.
src=/tmp/memops-src
mkdir -p "$src/build/cuda"
tar --exclude=./.whl --exclude=./build --exclude=./.git -cf - . | (cd "$src" && tar -xf -)
cp "$build"/torch_memops/_C*.so "$src/build/cuda/" 2>/dev/null
(cd "$src" && cat CMakeLists.txt $(find csrc cmake -type f | sort) | sha1sum | cut -c1-16 > build/cuda/.stamp)
BUDGET_S=$(left) STAGES="${STAGES:-build e2e decode}" DECODE_S="${DECODE_S:-0}" bash tools/gpu_bench.sh
echo "validate total: $(( $(date +%s) - start )) s"
