#!/usr/bin/env bash
# One kernel change checked on one GPU (about 5 minutes on a cold machine): the CUDA build
# (gpu_bench.sh's build stage, in /tmp/memops-src, reused while the sources match), the CUDA
# tests of the change, then its benchmark. Logs and JSON flat under $OUT, the benchmark's table
# printed last.
#   KERNELS=int8         int8 summaries: the int8 CUDA tests, benchmarks/bench_int8.py
#   KERNELS=apply        sparse_apply: its CUDA tests, benchmarks/bench_apply_variants.py (kernel variants)
#   KERNELS=step         the one-launch decode step (topk_sparse_apply): its tests, every CUDA op
#                        test (the kernels it shares were refactored), the error paths, and
#                        benchmarks/bench_decode.py $BENCH_ARGS (default: issue 11's cells)
#   BUDGET_S=560  TESTS_S=240  BENCH_S=150
set -uo pipefail
OUT="${OUT:-/tmp/memops-kernels-out}"; mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
KERNELS="${KERNELS:-apply}"
case "$KERNELS" in
  int8) files="tests/test_cuda.py tests/test_int8_summary.py"; select="int8 or test_int8_summary"
        bench=benchmarks/bench_int8.py ;;
  apply) files="tests/test_cuda.py"
        select="sparse_apply or rule_on_every or checked_mode or cuda_graph or opcheck or 2_pow_31"
        bench=benchmarks/bench_apply_variants.py ;;
  step) files="tests/test_topk_sparse_apply.py tests/test_cuda.py tests/test_errors.py tests/test_opcheck.py
              tests/test_error_subprocess.py"; select=""
        bench=benchmarks/bench_decode.py ;;
  *) echo "KERNELS must be int8, apply or step, got '$KERNELS'"; exit 2 ;;
esac
BENCH_ARGS="${BENCH_ARGS:-$([ "$KERNELS" = step ] && echo "--issue-cells --no-compile" || echo "$OUT")}"
start=$(date +%s)
export PYTHONUNBUFFERED=1
BUDGET_S="${BUDGET_S:-560}" STAGES=build OUT="$OUT" bash tools/gpu_bench.sh | grep -E "^build|rror"
cd /tmp/memops-src || exit 1
export PYTHONPATH="/tmp/memops-site:$PWD:${PYTHONPATH:-}"  # the wheels gpu_bench.sh installed, this tree
t0=$(date +%s)
timeout "${TESTS_S:-240}" python3 -m pytest $files -q -rs --tb=short -p no:cacheprovider ${select:+-k "$select"} \
  > "$OUT/tests.log" 2>&1
echo "tests: rc $? in $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed|Fatal|^E " "$OUT/tests.log" | head -40
export MEMOPS_BENCH_OUT="$OUT" MEMOPS_BENCH_DEADLINE=$(( $(date +%s) + ${BENCH_S:-150} - 30 ))
timeout "${BENCH_S:-150}" python3 "$bench" $BENCH_ARGS 2>&1 | tee "$OUT/timing.log"
echo "total: $(( $(date +%s) - start )) s"
