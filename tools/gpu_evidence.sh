#!/usr/bin/env bash
# One GPU call for a round's evidence (about 8 minutes on a cold machine): the CUDA build
# (gpu_bench.sh's build stage), the GPU tests named in TESTS, benchmarks/bench_int8.py, then
# tools/gpu_profile.sh twice: batch 1 at CONTEXTS with the planner (PLAN_DEVICES), and the energy
# cell (ENERGY_CELL, batch x context) with the pipeline compiled and no planner. Everything ends
# up in $OUT/evidence.tar.gz (the device tool brings back a few files per call).
#   BUDGET_S=560  STEPS="tests int8 b1 energy"  TESTS="tests/test_offload_mapped.py ..."  CONTEXTS=8192,32768,131072
#   B1_ARGS="--overhead-repeats 10" (more gpu_profile.py options for the batch-1 run)
#   ENERGY_CELL=4x131072  ENERGY_S=300 (seconds kept for the energy cell: dense eager, dense compiled
#   (StaticCache) and the pipeline compiled, each from a random-KV prefix: --prefill random, since the eager
#   prefill of 4 x 128K needs about 60 GB of MLP temporaries beside 64 GB of KV and 16 GB of weights)
set -uo pipefail
OUT="${OUT:-/tmp/memops-gpu-out}"; mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BUDGET_S="${BUDGET_S:-560}"
ENERGY_S="${ENERGY_S:-300}"
STEPS=" ${STEPS:-tests int8 b1 energy} "
ENERGY_CELL="${ENERGY_CELL:-4x131072}"
TREE=$PWD
SRC=/tmp/memops-src
start=$(date +%s)
left() { echo $((start + BUDGET_S - $(date +%s))); }
export PYTHONUNBUFFERED=1
BUDGET_S=$BUDGET_S STAGES=build OUT="$OUT" bash tools/gpu_bench.sh | grep -E "^build|rror"
if [[ "$STEPS" == *" tests "* && -n "${TESTS:-}" ]]; then
  (cd "$SRC" && PYTHONPATH="$SRC" timeout 240 python3 -m pytest -q -p no:cacheprovider $TESTS > "$OUT/tests.log" 2>&1)
  echo "tests: rc $? ($TESTS)"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | tail -8
fi
if [[ "$STEPS" == *" int8 "* ]]; then
  (cd "$SRC" && PYTHONPATH="$SRC" timeout 90 python3 benchmarks/bench_int8.py "$OUT" > "$OUT/bench_int8.log" 2>&1)
  echo "bench_int8: rc $?"; tail -14 "$OUT/bench_int8.log"
fi
[[ "$STEPS" == *" energy "* ]] || ENERGY_S=0
budget=$(( $(left) - ENERGY_S ))
if [[ "$STEPS" == *" b1 "* && "$budget" -gt 90 ]]; then
  OUT="$OUT/profile_b1" BUDGET_S=$budget CONTEXTS="${CONTEXTS:-8192,32768,131072}" BATCHES=1 \
    PROFILE_ARGS="${B1_ARGS:-}" bash tools/gpu_profile.sh | tail -40
fi
batch=${ENERGY_CELL%x*}; context=${ENERGY_CELL#*x}
budget=$(( $(left) - 10 ))
if [[ "$STEPS" == *" energy "* && "$budget" -gt 90 ]]; then
  OUT="$OUT/profile_energy" BUDGET_S=$budget CONTEXTS=$context BATCHES=$batch NEW_TOKENS=16 \
    PROFILE_ARGS="--path compiled --no-plan --overhead-repeats 0 --prefill random --dense-paths eager,compiled" bash tools/gpu_profile.sh | tail -14
fi
echo "total $(( $(date +%s) - start )) s"
# One archive: the device tool brings back only a few files per call.
tar -czf /tmp/evidence.tar.gz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/evidence.tar.gz "$OUT/"
