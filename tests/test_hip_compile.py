"""The GPU kernel sources compile for AMD GPUs (gfx90a) through the portability header.

Compile only: tools/hip_compile_check.sh builds tools/kernel_instantiations.cu, which instantiates
every kernel of csrc/include/memops/*.cuh for float32, float16 and bfloat16, with hipcc
(Debian 12: `apt-get install hipcc`).
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("hipcc") is None,
                    reason="hipcc not installed (Debian 12: apt-get install hipcc)")
def test_kernels_compile_for_gfx90a():
    result = subprocess.run(["bash", str(ROOT / "tools" / "hip_compile_check.sh")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled for gfx90a: OK" in result.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernels_compile_with_nvcc_without_torch(tmp_path):
    result = subprocess.run(
        ["nvcc", "-std=c++20", "-arch=sm_90", "-O3", "--expt-relaxed-constexpr",
         f"-I{ROOT / 'csrc' / 'include'}", "-c", str(ROOT / "tools" / "kernel_instantiations.cu"),
         "-o", str(tmp_path / "kernels.o")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
