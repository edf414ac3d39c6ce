#!/usr/bin/env bash
# One GPU call: build (gpu_bench.sh's build stage), the zero-copy probe (tools/gpu_mapped_probe.py)
# and bench_offload's offload row under cProfile. Results flat under $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/memops-gpu-out}"; mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
SRC=/tmp/memops-src
export PYTHONUNBUFFERED=1
BUDGET_S=500 STAGES=build OUT="$OUT" bash tools/gpu_bench.sh | grep -E "^build|rror"
cd "$SRC" || exit 1
export PYTHONPATH="$SRC"
timeout 120 python3 tools/gpu_mapped_probe.py --out "$OUT" > "$OUT/mapped_probe.log" 2>&1; echo "probe rc $?"
tail -30 "$OUT/mapped_probe.log"
timeout 200 python3 tools/gpu_offload_cprofile.py "$OUT" --new-tokens 8 --repeats 1 --warmup 1 > "$OUT/cprofile.log" 2>&1; echo "cprofile rc $?"
grep -E "^offload-ours|rror" "$OUT/cprofile.log" | tail -5
head -c 5000 "$OUT/offload_cprofile.txt"
