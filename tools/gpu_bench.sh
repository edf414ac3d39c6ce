#!/usr/bin/env bash
# One call on the GPU machine: the end-to-end generate() table (benchmarks/bench_e2e.py) and the
# decode-step table with FlashInfer in the same run (benchmarks/bench_decode.py), within a time
# budget. Results (JSON, Markdown, logs) go flat under $OUT.
#
#   BUDGET_S=500                      whole call, seconds (every stage is cut to fit)
#   STAGES="build e2e decode"         what to run (also "ops": bench_ops.py $OPS_ARGS, FlashInfer rows too;
#                                     "hf": tests/test_hf_static.py and tools/gpu_hf_check.py, first)
#   OPS_ARGS="--quick"
#   E2E_CELLS="8x32K,1x32K"           bench_e2e cells (all six: 1x8K,8x8K,1x32K,8x32K,1x128K,4x128K)
#   E2E_ROWS=all                      or a comma-separated subset of bench_e2e's rows
#   E2E_ARGS="--new-tokens 16 --repeats 3 --warmup 1"
#   E2E_MORE=""                       "CELLS ROWS": a second bench_e2e run after the first (other rows
#                                     for other cells), results tagged $TAG-more
#   HF_TESTS=1                        0: the hf stage runs gpu_hf_check.py only; the script exits
#                                     with gpu_hf_check.py's status (0 without the hf stage)
#   DECODE_S=100                      seconds kept for the decode stage when it runs
#   DECODE_ARGS="--issue-cells --no-compile"   (issue 11's eight cells; any bench_decode.py options)
#   TAG=""                            suffix of the result files
#
# It installs the wheels carried in .whl (FlashInfer and its two dependencies, plus whatever else
# is there) into /tmp/memops-site, builds the CUDA extension in a copy of the tree under /tmp
# (skipped when a build of the same sources is already there, e.g. on a warm machine), and runs
# the benchmarks from that copy.
set -uo pipefail
OUT="${OUT:-/tmp/memops-gpu-out}"
BUDGET_S="${BUDGET_S:-500}"
STAGES="${STAGES:-build e2e decode}"
E2E_CELLS="${E2E_CELLS:-8x32K,1x32K}"
E2E_ROWS="${E2E_ROWS:-all}"
E2E_ARGS="${E2E_ARGS:---new-tokens 16 --repeats 3 --warmup 1}"
DECODE_S="${DECODE_S:-100}"
DECODE_ARGS="${DECODE_ARGS:---issue-cells --no-compile}"
TAG="${TAG:-}"
SRC=/tmp/memops-src
SITE=/tmp/memops-site
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the benchmarks run from the /tmp copy
start=$(date +%s)
end=$((start + BUDGET_S - 15))
left() { echo $((end - $(date +%s))); }
export PYTHONUNBUFFERED=1 MEMOPS_BENCH_OUT="$OUT"
export TORCHINDUCTOR_CACHE_DIR=/tmp/memops-inductor TORCHINDUCTOR_COMPILE_THREADS=16
export FLASHINFER_WORKSPACE_BASE=/tmp/memops-flashinfer MAX_JOBS=16  # FlashInfer JIT cache and nvcc jobs
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv > "$OUT/nvidia-smi.txt" 2>&1
lscpu > "$OUT/lscpu.txt" 2>&1

# Wheels carried in .whl (no index: the machine reaches nothing outside).
if ls .whl/*.whl > /dev/null 2>&1 && [ ! -f "$SITE/.installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
    > "$OUT/pip.log" 2>&1 && touch "$SITE/.installed"
  echo "wheels: rc $? ($(ls .whl/*.whl | wc -l) files)"
fi

# A copy of the tree: sources of this call, build outputs kept when the sources are unchanged.
mkdir -p "$SRC"
tar --exclude=./.whl --exclude=./build --exclude=./.git -cf - . | (cd "$SRC" && tar -xf -)
export PYTHONPATH="$SITE:$SRC"
cd "$SRC" || exit 1
stamp=$(cat CMakeLists.txt $(find csrc cmake -type f | sort) 2>/dev/null | sha1sum | cut -c1-16)
if [[ " $STAGES " == *" build "* ]]; then
  if [ -f build/cuda/.stamp ] && [ "$(cat build/cuda/.stamp)" = "$stamp" ] &&
     ls build/cuda/_C*.so > /dev/null 2>&1; then
    cp build/cuda/_C*.so torch_memops/ && echo "build: reused (same sources)"
  else
    t0=$(date +%s)
    if ! { cmake -S . -B build/cuda -G Ninja -DMEMOPS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 &&
           cmake --build build/cuda -j16; } > "$OUT/build.log" 2>&1; then
      tail -40 "$OUT/build.log"; exit 1
    fi
    cp torch_memops/_C*.so build/cuda/ 2>/dev/null
    echo "$stamp" > build/cuda/.stamp
    echo "build: $(( $(date +%s) - t0 )) s"
  fi
fi
python3 -c "import torch, transformers, torch_memops; print('torch', torch.__version__, '| transformers', \
transformers.__version__)" 2>&1 | tail -1
python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>/dev/null ||
  echo "flashinfer: not importable (its rows are skipped)"

if [[ " $STAGES " == *" hf "* ]]; then
  # Graph-captured / compiled generate() tokens vs eager on this GPU (tools/gpu_hf.sh runs this stage).
  t0=$(date +%s)
  if [ "${HF_TESTS:-1}" = 1 ]; then
    (cd tests && timeout 150 python3 -m pytest -q -rs -p no:cacheprovider test_hf_static.py) \
      > "$OUT/tests_hf_static$TAG.log" 2>&1
    echo "tests/test_hf_static.py: rc $? in $(( $(date +%s) - t0 )) s"
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_hf_static$TAG.log" | head -10
  fi
  t0=$(date +%s)
  OUT="$OUT" timeout 300 python3 tools/gpu_hf_check.py > "$OUT/gpu_hf$TAG.log" 2>&1
  hf_rc=$?
  echo "gpu_hf_check: rc $hf_rc in $(( $(date +%s) - t0 )) s"
  grep -E "PASS|FAIL" "$OUT/gpu_hf$TAG.log" | head -20
fi
# bench_e2e on cells $1 with the arguments $3.. (rows), results tagged $2. The script stops
# starting rows near its deadline; timeout ends a row that overruns it.
run_e2e() {
  local cells=$1 tag=$2 t0
  shift 2
  t0=$(date +%s)
  MEMOPS_BENCH_DEADLINE=$e2e_end timeout $((e2e_end - t0 + 20)) \
    python3 benchmarks/bench_e2e.py --cells "$cells" "$@" $E2E_ARGS --row-margin 60 \
    --out "$OUT" --tag="$tag" > "$OUT/e2e$tag.log" 2>&1
  echo "bench_e2e $cells: rc $? in $(( $(date +%s) - t0 )) s"
  grep -E "^B[0-9]+ " "$OUT/e2e$tag.log" | tail -40
}
if [[ " $STAGES " == *" e2e "* ]]; then
  reserve=0
  [[ " $STAGES " == *" decode "* ]] && reserve=$DECODE_S
  e2e_end=$((end - reserve))
  rows=()
  [ "$E2E_ROWS" != all ] && rows=(--rows "$E2E_ROWS")
  run_e2e "$E2E_CELLS" "$TAG" "${rows[@]}"
  if [ -n "${E2E_MORE:-}" ]; then
    read -r more_cells more_rows <<< "$E2E_MORE"
    run_e2e "$more_cells" "$TAG-more" --rows "$more_rows"
  fi
fi
if [[ " $STAGES " == *" decode "* ]]; then
  t0=$(date +%s)
  budget=$(left)
  if [ "$budget" -gt 30 ]; then
    MEMOPS_BENCH_DEADLINE=$((end - 10)) timeout "$budget" \
      python3 benchmarks/bench_decode.py $DECODE_ARGS --tag="$TAG" > "$OUT/decode$TAG.log" 2>&1
    echo "bench_decode: rc $? in $(( $(date +%s) - t0 )) s"
  else
    echo "bench_decode: not run (${budget} s left)"
  fi
fi
if [[ " $STAGES " == *" ops "* ]]; then
  t0=$(date +%s)
  budget=$(left)
  if [ "$budget" -gt 30 ]; then
    MEMOPS_BENCH_DEADLINE=$((end - 10)) timeout "$budget" \
      python3 benchmarks/bench_ops.py ${OPS_ARGS:---quick} > "$OUT/ops$TAG.log" 2>&1
    echo "bench_ops: rc $? in $(( $(date +%s) - t0 )) s"
  else
    echo "bench_ops: not run (${budget} s left)"
  fi
fi
echo "total: $(( $(date +%s) - start )) s"
[ -f "$OUT/bench_decode$TAG.md" ] &&
  grep -E "FlashInfer|memops step, CUDA|cudnn\], CUDA" "$OUT/bench_decode$TAG.md" | cut -c1-160 | tail -24
[ -f "$OUT/bench_e2e$TAG.md" ] && sed -n '/^| cell | floor/,/^$/p' "$OUT/bench_e2e$TAG.md"
exit "${hf_rc:-0}"  # the hf stage's check decides the status (tools/gpu_hf.sh); benchmarks never fail it
