"""The GPU kernel sources compile for AMD GPUs (gfx90a) through the portability header.

Compile only: tools/hip_compile_check.sh builds tools/kernel_instantiations.cu, which instantiates
every kernel of csrc/include/memops/*.cuh for float32, float16 and bfloat16, with hipcc
(Debian 12: `apt-get install hipcc`).
"""

import glob
import os
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


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_translation_units_link_together(tmp_path):
    """Every csrc/cuda/*.cu compiles on its own and the objects link into one library: a kernel
    defined (not inline, not a template, not static) in a header that two .cu files include is two
    definitions, which only the link shows (the H200 build failed so once). Device code unoptimised:
    only the symbols matter here."""
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources
    jobs = [subprocess.Popen(["nvcc", "-std=c++20", "-arch=sm_90", "-O0", "-Xptxas", "-O0", "--expt-relaxed-constexpr",
                              f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}", "-Xcompiler", "-fPIC", "-c",
                              str(src), "-o", str(tmp_path / f"{src.stem}.o")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for src in sources]
    for src, job in zip(sources, jobs):
        out, _ = job.communicate(timeout=900)
        assert job.returncode == 0, f"{src.name}:\n{out}"
    link = subprocess.run(["nvcc", "-shared", "-arch=sm_90", *map(str, sorted(tmp_path.glob("*.o"))),
                           "-o", str(tmp_path / "kernels.so")], capture_output=True, text=True, timeout=300)
    assert link.returncode == 0, link.stdout + link.stderr


def _cuda_include_dir():
    for root in [os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


@pytest.mark.skipif(_cuda_include_dir() is None or shutil.which("g++") is None,
                    reason="no CUDA toolkit headers or no g++")
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cpp")))
def test_cuda_bindings_compile_with_the_host_compiler(source, tmp_path):
    """The torch bindings (csrc/cuda/*.cpp) pass the host compiler's syntax and type checks against
    the installed torch's headers, even on a CPU torch (whose wheel lacks only the generated
    c10/cuda/impl/cuda_cmake_macros.h, stubbed here): a CPU-only build never compiles them."""
    import torch

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    torch_include = Path(torch.__file__).resolve().parent / "include"
    if not (torch_include / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip("this torch has no c10/cuda headers")
    result = subprocess.run(
        ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-unused-parameter", "-Werror",
         "-DMEMOPS_WITH_CUDA", f"-I{tmp_path}", f"-I{torch_include}",
         f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{_cuda_include_dir()}",
         f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "cuda" / source)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
