"""C-simulation of the HLS kernels: ``hls/Makefile`` writes golden vectors with
``torch_memops/reference.py`` and builds each kernel's testbench with g++ and the vendor
``ap_int.h`` / ``hls_stream.h`` (from hls4ml); every testbench must report 0 errors."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HLS = Path(__file__).resolve().parent.parent / "hls"
KERNELS = ["prepare_memory", "topk_relevancy", "gather_retrieve"]


@pytest.fixture(scope="module")
def csim_build(tmp_path_factory):
    if shutil.which("make") is None or shutil.which("g++") is None:
        pytest.skip("make and g++ are needed for C-simulation")
    build = tmp_path_factory.mktemp("hls_build")
    include = subprocess.run(["make", "-s", "-C", str(HLS), f"PYTHON={sys.executable}",
                              "print-hls-include"],
                             capture_output=True, text=True).stdout.strip()
    if not include or not all((Path(include) / h).exists() for h in ("ap_int.h", "hls_stream.h")):
        pytest.skip("ap_int.h / hls_stream.h not found: pip install --no-deps hls4ml "
                    "(or set HLS_INCLUDE)")
    result = subprocess.run(["make", "-C", str(HLS), f"BUILD={build}", f"PYTHON={sys.executable}",
                             "tb", "golden"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return build


@pytest.mark.parametrize("kernel", KERNELS)
def test_csim_testbench_reports_zero_errors(csim_build, kernel):
    result = subprocess.run([str(csim_build / "csim" / f"tb_{kernel}"),
                             str(csim_build / "golden" / kernel)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().splitlines()[-1] == "errors: 0"
    assert " 0 errors" in result.stdout


@pytest.mark.parametrize("kernel", KERNELS)
def test_qor_names_the_kernel_and_its_loops(kernel):
    qor = json.loads((HLS / kernel / "qor.json").read_text())
    source = (HLS / kernel / f"{kernel}.cpp").read_text()
    assert qor["kernel"] == f"memops_{kernel}"
    assert f'extern "C" void {qor["kernel"]}(' in source
    assert qor["target_clock_mhz"] == 300
    for stage in qor["dataflow"]:
        assert re.search(rf"\b{stage}\(", source), stage
    for label in qor["loops"]:
        assert re.search(rf"^\s*{label}:", source, re.MULTILINE), label
