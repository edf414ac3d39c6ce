#!/usr/bin/env bash
# One call on the GPU machine after a merge: build with CUDA, run the whole test suite there
# (torch 2.11, transformers 5.17), the end-to-end decode benchmark, and the tensor-parallel check
# when two GPUs are present. Logs and JSON go to $OUT (flat, for the device tool's limits).
set -uo pipefail
OUT="${OUT:-/tmp/memops-gpu-out}"
mkdir -p "$OUT"
start=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt"
if ! { cmake -S . -B build/dev -G Ninja -DMEMOPS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 &&
       cmake --build build/dev -j16; } > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

# Errors must raise without any preload (docs/cuda.md, "The C++ runtime"): record both probes.
for probe in "import torch; torch.zeros(2).view(3)" \
             "import torch, torch_memops; torch_memops.prepare_memory(torch.randn(1, 1, 8, 8), 0)"; do
  python3 -c "$probe" > /dev/null 2>&1; echo "error probe without preload: rc $? for: $probe"
done
python3 -c "import torch, torch_memops; torch_memops.prepare_memory(torch.randn(1, 1, 8, 8), 0)" \
  2>&1 | tail -1

t0=$(date +%s)
(cd tests && timeout 270 python3 -m pytest -q -rs -p no:cacheprovider) > "$OUT/tests.log" 2>&1
echo "tests: rc $? in $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed|Fatal" "$OUT/tests.log" | head -30

t0=$(date +%s)
# A short check that generate() runs on every path (the table itself: tools/gpu_bench.sh).
timeout 240 python3 benchmarks/bench_e2e.py --cells 1x8K --rows stock-dynamic,ours-eager,ours-compiled \
  --repeats 1 --new-tokens 4 --out "$OUT" > "$OUT/e2e.log" 2>&1
echo "bench_e2e: rc $? in $(( $(date +%s) - t0 )) s"
tail -15 "$OUT/e2e.log"

if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  timeout 90 torchrun --nproc-per-node 2 benchmarks/tp_check.py --json "$OUT/tp.json" \
    > "$OUT/tp.log" 2>&1
  echo "tp_check: rc $?"
  tail -8 "$OUT/tp.log"
fi
echo "total: $(( $(date +%s) - start )) s"
