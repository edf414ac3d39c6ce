#!/usr/bin/env bash
# Compiles every GPU kernel of csrc/include/memops/*.cuh for AMD gfx90a (MI210) with hipcc,
# through tools/kernel_instantiations.cu, which uses no torch headers. Compile only: no GPU needed.
# Debian 12: `apt-get install hipcc` provides hipcc, the HIP headers and the ROCm device libraries.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
arch="${MEMOPS_HIP_ARCH:-gfx90a}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
HIP_PLATFORM=amd hipcc -x hip -std=c++17 -O3 --offload-arch="$arch" -Werror \
  -I"$root/csrc/include" -c "$root/tools/kernel_instantiations.cu" -o "$out/kernels.o"
echo "memops GPU kernels compiled for $arch: OK"
