#!/usr/bin/env bash
# sparse_apply's split merge in the split kernel (default) against the separate merge kernel
# (MEMOPS_CUDA_FUSED_MERGE=0), on one GPU: build the CUDA extension in place, run the
# sparse_apply CUDA tests (the split-merge ones included), then time both paths as CUDA-graph
# replays at the decode cells of issue 11 (bf16, page 16). Logs and JSON flat under $OUT; the
# table is printed last. About 5 minutes with the build.
set -uo pipefail
OUT="${OUT:-/tmp/memops-applymerge-out}"
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
timeout 240 python3 -m pytest tests/test_cuda.py -q -rs --tb=short \
  -k "sparse_apply or rule_on_every or checked_mode or cuda_graph or opcheck or 2_pow_31" \
  > "$OUT/tests.log" 2>&1
echo "tests: rc $? in $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed|Fatal|^E " "$OUT/tests.log" | head -40
timeout 150 python3 benchmarks/bench_apply_merge.py "$OUT" 2>&1 | tee "$OUT/timing.log"
echo "total: $(( $(date +%s) - start )) s"
