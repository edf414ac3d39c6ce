#!/usr/bin/env bash
# One call on the GPU machine for the static MemopsCache: gpu_bench.sh's build and hf stages (the
# CUDA build in /tmp/memops-src, reused while the sources match; tests/test_hf_static.py on the GPU
# machine's transformers; tools/gpu_hf_check.py: graph-captured and compiled generate() tokens vs
# eager, no device-to-host sync in a decode step, the deferred stop check). Logs flat under $OUT;
# the exit status is gpu_hf_check.py's. BUILD=0 skips the build; HF_TESTS=0 the tests.
if [ "${BUILD:-1}" = 1 ]; then stages="build hf"; else stages="hf"; fi
STAGES="$stages" exec bash "$(dirname "$0")/gpu_bench.sh"
