"""The checked mode switch (torch_memops.set_value_checks, MEMOPS_VALUE_CHECKS).

What it changes on the CUDA backend is tested in test_cuda.py (the out-of-range rule with it off,
the CPU's error with it on, off inside CUDA-graph capture). Here: the switch itself, the
environment variable, and that the CPU rejects bad values whatever its setting.
"""

import os
from pathlib import Path
import subprocess
import sys

import pytest
import torch

import torch_memops
from torch_memops import ops



@pytest.fixture(autouse=True)
def _restore():
    previous = torch_memops.value_checks()
    yield
    torch_memops.set_value_checks(previous)


def test_switch_round_trips():
    torch_memops.set_value_checks(True)
    assert torch_memops.value_checks() is True
    assert torch.ops.memops_settings.value_checks() is True
    torch_memops.set_value_checks(False)
    assert torch_memops.value_checks() is False


@pytest.mark.parametrize("value,expected", [(None, False), ("1", True), ("0", False),
                                            ("", False), ("yes", True)])
def test_environment_variable_sets_it_at_load(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "MEMOPS_VALUE_CHECKS"}
    if value is not None:
        env["MEMOPS_VALUE_CHECKS"] = value
    # The torch_memops this process imported (the checkout or an installed wheel), from a folder
    # that cannot shadow it.
    package_root = str(Path(torch_memops.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, "-c", "import torch_memops as m; print(m.value_checks())"],
                         capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path(__file__).resolve().parent)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(expected)


@pytest.mark.parametrize("checked", [False, True])
def test_cpu_rejects_bad_values_either_way(checked):
    torch_memops.set_value_checks(checked)
    memory = torch.randn(1, 1, 20, 8)
    with pytest.raises(ValueError, match=r"`indices` holds page 9 .*outside \[-1, N\) = \[-1, 3\)"):
        ops.gather_retrieve(memory, torch.tensor([[[0, 9]]], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match=r"`seq_lens\[0\]` = 1000000 is outside \[0, S\] = \[0, 20\]"):
        ops.prepare_memory(memory, 8, seq_lens=torch.tensor([10**6], dtype=torch.int32))


def test_value_error_word_is_cuda_only():
    with pytest.raises(ValueError, match="`device` must be a CUDA device, got cpu"):
        torch_memops.value_error_word("cpu")
    if torch._C._dispatch_has_kernel_for_dispatch_key("memops::sparse_apply", "CUDA"):
        pytest.skip("built with CUDA: tests/test_cuda.py tests the word")
    with pytest.raises(RuntimeError, match="built without its CUDA kernels"):
        torch.ops.memops_settings.value_error_word(0)
