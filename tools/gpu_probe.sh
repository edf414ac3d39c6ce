#!/usr/bin/env bash
# The scoring/selection probe on one GPU (tools/probe_scoring.cu; no torch): built twice, with this
# tree's headers and with the selection header in probe_old/ (when present, e.g. the previous
# commit's topk_relevancy.cuh), both timed in the same call, then Nsight Compute sections of the
# scoring and selection kernels. Optionally the CUDA build and tests first (TESTS="...").
#   TESTS=""  NCU=1  PROBE_ARGS=""
set -uo pipefail
OUT="${OUT:-/tmp/memops-probe-out}"; mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
start=$(date +%s)
flags="-std=c++20 -O3 -arch=sm_90 --expt-relaxed-constexpr"
nvcc $flags -Icsrc/include tools/probe_scoring.cu -o /tmp/probe_new > "$OUT/probe_build.log" 2>&1 &
if [ -d probe_old ]; then
  rm -rf /tmp/probe_old_inc && cp -a csrc/include /tmp/probe_old_inc && cp probe_old/*.cuh /tmp/probe_old_inc/memops/
  nvcc $flags -I/tmp/probe_old_inc tools/probe_scoring.cu -o /tmp/probe_old >> "$OUT/probe_build.log" 2>&1 &
fi
if [ -n "${TESTS:-}" ]; then
  BUDGET_S=400 STAGES=build OUT="$OUT" bash tools/gpu_bench.sh | grep -E "^build|rror"
  (cd /tmp/memops-src && PYTHONPATH="/tmp/memops-site:$PWD" timeout "${TESTS_S:-200}" \
     python3 -m pytest $TESTS -q -rs --tb=short -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} > "$OUT/tests.log" 2>&1
   echo "tests: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed|Fatal|^E " "$OUT/tests.log" | head -30)
fi
wait
echo "probe builds: $(( $(date +%s) - start )) s"; grep -i error "$OUT/probe_build.log" | head
/tmp/probe_new ${PROBE_ARGS:-} > "$OUT/probe_new.txt" 2>&1; echo "probe new: rc $?"
[ -x /tmp/probe_old ] && { /tmp/probe_old ${PROBE_ARGS_OLD:-"" default} > "$OUT/probe_old.txt" 2>&1; echo "probe old: rc $?"; }
if [ "${NCU:-1}" = 1 ] && command -v ncu > /dev/null; then
  sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section SchedulerStats"
  for shape in "L3 B8 32K" "L3 B1 32K"; do
    timeout 90 ncu --clock-control none $sections -k regex:relevancy_tc_kernel --launch-skip 8 --launch-count 1 \
      /tmp/probe_new "$shape" none > "$OUT/ncu_scoring_${shape// /_}.txt" 2>&1
    echo "ncu scoring $shape: rc $?"
  done
  for bin in new old; do
    [ -x /tmp/probe_$bin ] || continue
    timeout 90 ncu --clock-control none $sections -k regex:select_topk_small --launch-skip 8 --launch-count 1 \
      /tmp/probe_$bin "L3 B8 32K" none > "$OUT/ncu_select_$bin.txt" 2>&1
    echo "ncu select $bin: rc $?"
  done
fi
echo "total: $(( $(date +%s) - start )) s"
