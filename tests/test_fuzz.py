"""A short run of tools/fuzz_ops.py per host device, in a subprocess (a crash shows as its exit
status): random valid cases match the reference (fpga: the CPU, bit for bit) and every bad input
gets a named error with its inputs untouched. docs/reliability.md records the long runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("device", ["cpu", "fpga"])
def test_short_fuzz_run_keeps_the_contract(device):
    env = dict(os.environ, TORCH_MEMOPS_FPGA="emulation")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fuzz_ops.py"), "--device", device, "--valid", "12",
         "--bad", "3", "--seed", str(os.getpid())],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["failures"] == 0
    assert sum(sum(c.values()) for c in summary["bad"].values()) > 50
