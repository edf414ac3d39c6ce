#!/usr/bin/env bash
# Issue 10 on the GPU machine, in one call (about 6 minutes): build with CUDA in a /tmp copy with
# the image's own compiler settings (its CXX has no shared libstdc++.so: the build must cope), then
#   1. the module links the shared libstdc++ and defines no std::locale symbols,
#   2. the probe raises ValueError with no LD_PRELOAD (it died with SIGSEGV before),
#   3. every error path of every backend raises in a subprocess; the checked-mode switch,
#   4. tests/test_cuda.py (the out-of-range rule, checked mode, CUDA-graph capture),
#   5. compute-sanitizer memcheck over the bad inputs and fuzzed valid ones
#      (tools/sanitize_cases.py, caching allocator off).
# Logs go flat to $OUT; a summary table is printed last.  BUDGET_S (default 540) bounds it.
set -uo pipefail
OUT="${OUT:-/tmp/memops-safety-out}"
BUDGET_S="${BUDGET_S:-540}"
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
cap() { local want=$1 l; l=$(( $(left) - ${2:-10} )); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 5 ] && want=5; echo "$want"; }
declare -a ROWS
row() { ROWS+=("$(printf '%-34s %-8s %s' "$1" "$2" "$3")"); }

unset LD_PRELOAD
SRC="$PWD"
WORK=/tmp/memops-safety
rm -rf "$WORK" && mkdir -p "$WORK"
tar -C "$SRC" --exclude=./build --exclude='./torch_memops/_C*.so' --exclude=./.git -cf - . |
  tar -C "$WORK" -xf -
cd "$WORK" || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$WORK"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/nvidia-smi.txt" 2>&1
echo "GPU: $(head -1 "$OUT/nvidia-smi.txt"); CXX=${CXX:-unset}; $(${CXX:-c++} --version | head -1)"

# --- build (image defaults: no CXX override) -------------------------------------------------
t0=$(date +%s)
# CMAKE_ARGS / JOBS: for a dry run of this script on a machine without a GPU (-DMEMOPS_CUDA=OFF).
if timeout "$(cap "${BUILD_S:-300}" 200)" bash -c "cmake -S . -B build/dev -G Ninja \
     ${CMAKE_ARGS:--DMEMOPS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90} &&
     cmake --build build/dev -j${JOBS:-16}" > "$OUT/build.log" 2>&1; then
  row "build (CUDA, image CXX)" "ok" "$(( $(date +%s) - t0 )) s"
else
  row "build (CUDA, image CXX)" "FAIL" "see build.log"
  tail -40 "$OUT/build.log"
fi
grep -E "torch_memops: .*libstdc\+\+|unusable|std::locale" "$OUT/build.log" | head -5
so=$(ls torch_memops/_C*.so 2>/dev/null | head -1)
if [ -z "$so" ]; then
  printf '%-34s %-8s %s\n' "check" "result" "detail"; printf '%s\n' "${ROWS[@]}"; exit 1
fi

# --- 1. one C++ runtime ------------------------------------------------------------------------
ldd "$so" > "$OUT/ldd.txt" 2>&1
stdcxx=$(grep -o 'libstdc++.so.6 => [^ ]*' "$OUT/ldd.txt" | head -1)
locale_syms=$(nm -D --defined-only "$so" | grep -c _ZNSt6locale)
if [ -n "$stdcxx" ] && [ "$locale_syms" = 0 ]; then r=ok; else r=FAIL; fi
row "shared libstdc++, no static copy" "$r" "${stdcxx:-no libstdc++ NEEDED}; locale symbols: $locale_syms"
gomp=$(grep -o 'libgomp[^ ]* => [^ ]*' "$OUT/ldd.txt" | head -1)
gomp_syms=$(nm -D --defined-only "$so" | grep -c GOMP_parallel)
row "shared libgomp, no static copy" "$([ -n "$gomp" ] && [ "$gomp_syms" = 0 ] && echo ok || echo FAIL)" \
  "${gomp:-no libgomp NEEDED}; GOMP symbols: $gomp_syms"

# --- 2. the probe, no LD_PRELOAD ---------------------------------------------------------------
for probe in "import torch; torch.zeros(2).view(3)" \
             "import torch, torch_memops; torch_memops.prepare_memory(torch.randn(1, 1, 8, 8), 0)"; do
  timeout 60 python3 -c "$probe" > "$OUT/probe.log" 2>&1
  rc=$?
  last=$(tail -1 "$OUT/probe.log")
  case "$probe" in
    *torch_memops*) name="probe: memops error, no preload"; want="ValueError: memops.prepare_memory: \`page_size\` must be > 0, got 0";;
    *) name="probe: torch error, no preload"; want="RuntimeError: shape '[3]' is invalid for input of size 2";;
  esac
  if [ $rc -eq 1 ] && [ "$last" = "$want" ]; then r=ok; else r=FAIL; fi
  row "$name" "$r" "rc $rc: ${last:0:90}"
done

# --- 3. error paths in subprocesses; the checked-mode switch -------------------------------------
t0=$(date +%s)
timeout "$(cap 120 200)" python3 -m pytest -q -rs -p no:cacheprovider tests/test_error_subprocess.py \
  tests/test_value_checks.py > "$OUT/error_paths.log" 2>&1
rc=$?
row "error paths (subprocess) + switch" "$([ $rc -eq 0 ] && echo ok || echo FAIL)" \
  "rc $rc, $(grep -E '[0-9]+ (passed|failed|skipped)' "$OUT/error_paths.log" | tail -1) ($(( $(date +%s) - t0 )) s)"

# --- 4. tests/test_cuda.py -------------------------------------------------------------------
t0=$(date +%s)
timeout "$(cap 170 170)" python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
  > "$OUT/test_cuda.log" 2>&1
rc=$?
row "tests/test_cuda.py" "$([ $rc -eq 0 ] && echo ok || echo FAIL)" \
  "rc $rc, $(grep -E '[0-9]+ (passed|failed|skipped)' "$OUT/test_cuda.log" | tail -1) ($(( $(date +%s) - t0 )) s)"
grep -E "^(FAILED|ERROR)" "$OUT/test_cuda.log" | head -15

# --- 5. compute-sanitizer memcheck -------------------------------------------------------------
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  t0=$(date +%s)
  budget=$(cap 200 15)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$budget" "$SAN" --tool memcheck --error-exitcode 99 \
    --print-limit 20 python3 tools/sanitize_cases.py --fuzz 40 --budget-s $(( budget - 60 )) \
    > "$OUT/memcheck.log" 2>&1
  rc=$?
  summary=$(grep -E "ERROR SUMMARY" "$OUT/memcheck.log" | tail -1)
  cases=$(grep -E "^sanitize_cases:" "$OUT/memcheck.log" | tail -1)
  row "memcheck: bad + fuzzed inputs" "$([ $rc -eq 0 ] && echo ok || echo FAIL)" \
    "rc $rc; ${summary:-no summary}; ${cases:-unfinished} ($(( $(date +%s) - t0 )) s)"
  grep -E "MISMATCH|Invalid|out of bounds" "$OUT/memcheck.log" | head -10
else
  row "memcheck: bad + fuzzed inputs" "SKIP" "compute-sanitizer not found"
fi

echo
echo "total: $(( $(date +%s) - start )) s"
printf '%-34s %-8s %s\n' "check" "result" "detail"
printf '%s\n' "${ROWS[@]}"
