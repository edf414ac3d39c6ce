"""The native XRT runtime compiles and links against XRT (Debian's libxrt-dev in CI), without a
card: a small program is built from the same runtime sources as the extension, with
MEMOPS_WITH_XRT, linked to libxrt_coreutil, and run (it also checks the emulation's sync, mapping
and bank rules without torch)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
XRT_INCLUDE_CANDIDATES = [Path("/usr/include/xrt"), Path("/opt/xilinx/xrt/include")]
XRT_LIB_CANDIDATES = [Path("/usr/lib/x86_64-linux-gnu"), Path("/opt/xilinx/xrt/lib")]


def find_xrt():
    include = next((p for p in XRT_INCLUDE_CANDIDATES if (p / "xrt" / "xrt_bo.h").exists()), None)
    lib = next((p for p in XRT_LIB_CANDIDATES if (p / "libxrt_coreutil.so").exists()), None)
    return include, lib


def find_libuuid(lib):
    """xrt::uuid calls libuuid inline; the runtime library libuuid.so.1 (a dependency of XRT)
    is linked by path so that uuid-dev is not needed."""
    for folder in (lib, Path("/usr/lib/x86_64-linux-gnu"), Path("/lib/x86_64-linux-gnu")):
        for name in ("libuuid.so", "libuuid.so.1"):
            if (folder / name).exists():
                return folder / name
    return None


def test_native_runtime_compiles_links_and_runs(tmp_path):
    include, lib = find_xrt()
    if include is None or lib is None:
        pytest.skip("XRT headers/libraries not found (apt-get install libxrt-dev)")
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found")
    sources = [
        ROOT / "tests" / "fpga" / "xrt_link_check.cpp",
        ROOT / "csrc" / "fpga" / "xrt_runtime.cpp",
        ROOT / "csrc" / "fpga" / "xrt_emulation.cpp",
        ROOT / "csrc" / "fpga" / "xrt_native.cpp",
        ROOT / "hls" / "prepare_memory" / "prepare_memory.cpp",
        ROOT / "hls" / "topk_relevancy" / "topk_relevancy.cpp",
        ROOT / "hls" / "gather_retrieve" / "gather_retrieve.cpp",
    ]
    program = tmp_path / "xrt_link_check"
    command = [
        compiler, "-std=c++20", "-O1", "-Wall", "-Werror", "-Wno-unknown-pragmas",
        "-Wno-unused-label", "-DMEMOPS_WITH_XRT", f"-I{ROOT / 'csrc'}",
        f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'hls'}", f"-I{ROOT / 'hls' / 'common'}",
        "-isystem", str(include), *map(str, sources), f"-L{lib}", "-lxrt_coreutil",
        *([str(find_libuuid(lib))] if find_libuuid(lib) else []),
        f"-Wl,-rpath,{lib}", "-o", str(program),
    ]
    build = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    linked = subprocess.run(["ldd", str(program)], capture_output=True, text=True)
    assert "libxrt_coreutil" in linked.stdout
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("ok")
