#!/usr/bin/env bash
# One call on the GPU machine (at most 7 minutes, build included): serving KV that does not fit on
# the GPU (benchmarks/bench_offload.py): the all-GPU pipeline, MemopsConfig(offload="host") and
# transformers' offloaded cache, the last two with the GPU's memory capped so that the cell's KV
# is KV_OVER_FREE times what the process may use beyond the weights. Results (JSON, Markdown,
# logs) go flat under $OUT; the table is printed last.
#
#   BUDGET_S=420            whole call, seconds (the benchmark stops starting rows near the end)
#   CELL=4x32K              batch x context
#   LAYERS=16               decoder layers of the Llama-3-8B-shaped model (random weights, bf16)
#   OFFLOAD_ARGS="--budget 1024 --page-size 16 --new-tokens 8 --repeats 3 --warmup 1 --kv-over-free 3"
#   TAG=""                  suffix of the result files
#   TESTS=""                pytest files to run on the GPU first (e.g. tests/test_offload_mapped.py)
#
# It builds the CUDA extension through tools/gpu_bench.sh's build stage (a copy of the tree under
# /tmp/memops-src, reused when build/cuda/.stamp matches the sources) and runs from that copy.
# CPU dry run of the same script (no build, the tiny model): CPU_SMOKE=1 tools/gpu_offload.sh
set -uo pipefail
OUT="${OUT:-/tmp/memops-gpu-out}"
BUDGET_S="${BUDGET_S:-420}"
CELL="${CELL:-4x32K}"
LAYERS="${LAYERS:-16}"
OFFLOAD_ARGS="${OFFLOAD_ARGS:---budget 1024 --page-size 16 --new-tokens 8 --repeats 3 --warmup 1 --kv-over-free 3}"
TAG="${TAG:-}"
CPU_SMOKE="${CPU_SMOKE:-0}"
SRC=/tmp/memops-src  # where tools/gpu_bench.sh builds
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the benchmark runs from the /tmp copy
start=$(date +%s)
end=$((start + BUDGET_S - 15))
export PYTHONUNBUFFERED=1 MEMOPS_BENCH_OUT="$OUT"
if [ "$CPU_SMOKE" = 1 ]; then
  # The CPU dry run: the extension this checkout built, the tiny model, no copy of the tree.
  export PYTHONPATH="$PWD"
  MEMOPS_BENCH_DEADLINE=$end timeout $((end - start + 10)) \
    python3 benchmarks/bench_offload.py --cpu-smoke --repeats 1 --out "$OUT" --tag="$TAG" > "$OUT/offload$TAG.log" 2>&1
  echo "bench_offload (CPU smoke): rc $? in $(( $(date +%s) - start )) s"
  [ -f "$OUT/bench_offload$TAG.md" ] && sed -n '/^| row |/,/^$/p' "$OUT/bench_offload$TAG.md"
  exit 0
fi

# The copy of the tree in /tmp/memops-src and the CUDA build: gpu_bench.sh's build stage (reused
# when the sources match a build already there).
BUDGET_S=$BUDGET_S STAGES=build OUT="$OUT" bash tools/gpu_bench.sh | grep -E "^build|rror"
export PYTHONPATH="$SRC"
[ -d /tmp/memops-site ] && export PYTHONPATH="/tmp/memops-site:$SRC"
cd "$SRC" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max \
  --format=csv > "$OUT/nvidia-smi.txt" 2>&1
lscpu > "$OUT/lscpu.txt" 2>&1
free -g > "$OUT/free.txt" 2>&1
python3 -c "import torch, transformers, torch_memops; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| cuda', torch.cuda.is_available())" 2>&1 | tail -1

if [ -n "${TESTS:-}" ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider $TESTS > "$OUT/tests$TAG.log" 2>&1
  echo "tests ($TESTS): rc $?"; tail -4 "$OUT/tests$TAG.log"
fi
t0=$(date +%s)
# The script stops starting rows near its deadline; timeout ends a row that overruns it.
MEMOPS_BENCH_DEADLINE=$end timeout $((end - t0 + 10)) \
  python3 benchmarks/bench_offload.py --cell "$CELL" --layers "$LAYERS" $OFFLOAD_ARGS --row-margin 35 \
  --out "$OUT" --tag="$TAG" > "$OUT/offload$TAG.log" 2>&1
echo "bench_offload: rc $? in $(( $(date +%s) - t0 )) s (total $(( $(date +%s) - start )) s)"
grep -E "^(gpu|offload|capped)-" "$OUT/offload$TAG.log" | tail -10
grep -E "Error|error:" "$OUT/offload$TAG.log" | grep -v "^|" | tail -5
[ -f "$OUT/bench_offload$TAG.md" ] && sed -n '/^Cell /p;/^| row |/,/^$/p;/^Summary/p' "$OUT/bench_offload$TAG.md"
exit 0
