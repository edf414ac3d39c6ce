#!/usr/bin/env bash
# One call on the GPU machine (about 5 minutes, plus the CUDA build on a cold machine): dense vs the memops pipeline at 8K and 32K on the
# Llama 3.1 8B architecture (random weights, bf16): ms per decode token by step, the
# memory-processing share, energy per decode token from NVML; then the planner's ranked
# placements at 8K and its predicted-vs-measured error (tools/gpu_profile.py). Every measured
# configuration runs after one unreported warm-up run of the same length; per-step timing is on
# the decode tokens the profiler's 2.5 % budget allows (SAMPLE_EVERY=auto, or N); the profiler's
# overhead is measured at 8K (5 alternated pairs, median and spread) for SAMPLE_EVERY and for
# every token; each row says which decode path ran. Results go flat
# under $OUT: summary.md (the table printed last), profile_<context>_<batch>.json, plan.json,
# breakdown.png (if matplotlib is there), logs.
#   BUDGET_S=420  CONTEXTS=8192,32768  BATCHES=1  BUDGET_TOKENS=2048  NEW_TOKENS=16  PLAN_DEVICES=cuda,cpu,fpga
#   SAMPLE_EVERY=auto  PROFILE_ARGS="--path compiled --no-plan --overhead-repeats 0"  (more gpu_profile.py options)
set -uo pipefail
OUT="${OUT:-/tmp/memops-gpu-out}"
BUDGET_S="${BUDGET_S:-420}"
SRC=/tmp/memops-src
mkdir -p "$OUT"
start=$(date +%s)
export PYTHONUNBUFFERED=1
# The build (and the copy of the tree in $SRC) is gpu_bench.sh's build stage: reused when the
# sources match a build already there.
BUDGET_S=$BUDGET_S STAGES=build OUT="$OUT" bash tools/gpu_bench.sh | grep -E "^build|^torch|rror"
cd "$SRC" || exit 1
export PYTHONPATH="$SRC"
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv > "$OUT/nvidia-smi.txt" 2>&1
deadline=$((start + BUDGET_S - 20))
timeout $((deadline - $(date +%s) + 15)) python3 tools/gpu_profile.py --out "$OUT" \
  --contexts "${CONTEXTS:-8192,32768}" --batches "${BATCHES:-1}" --budget "${BUDGET_TOKENS:-2048}" \
  --new-tokens "${NEW_TOKENS:-16}" --plan-devices "${PLAN_DEVICES:-cuda,cpu,fpga}" ${PROFILE_ARGS:-} --deadline "$deadline" \
  --sample-every "${SAMPLE_EVERY:-auto}" \
  > "$OUT/gpu_profile.log" 2>&1
echo "gpu_profile.py: rc $? in $(( $(date +%s) - start )) s"
grep -vE "Converting|Warning|warn\(" "$OUT/gpu_profile.log" | tail -50
