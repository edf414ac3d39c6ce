"""The XRT runtime under the fpga device: host and device copies kept apart (a forgotten sync
shows stale data), device-only buffers, HBM banks, backend choice, xclbin loading, pyxrt."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_memops
from torch_memops import fpga, ops


def emulated():
    return fpga.backend() == "emulation"


def test_host_write_without_sync_does_not_reach_the_device():
    x = torch.randn(64, 32)
    f = x.to("fpga")
    fpga.host_copy(f).fill_(7.0)  # the host copy only: no sync
    keys = f.view(1, 1, 64, 32)
    # The kernel reads the device copy: still x.
    assert torch.equal(ops.prepare_memory(keys, 16).cpu(), ops.prepare_memory(x.view(1, 1, 64, 32), 16))
    fpga.host_copy(f).fill_(7.0)
    fpga.sync(f, "to_device")
    assert torch.equal(f.cpu(), torch.full((64, 32), 7.0))


def test_kernel_output_is_stale_on_the_host_until_synced():
    keys = torch.randn(2, 2, 48, 32)
    expected = ops.prepare_memory(keys, 16)
    summary = ops.prepare_memory(keys.to("fpga"), 16)
    stale = fpga.host_copy(summary).clone()
    assert not torch.equal(stale, expected)
    fpga.sync(summary, "from_device")
    assert torch.equal(fpga.host_copy(summary), expected)


def test_sync_of_a_view_moves_only_its_bytes():
    x = torch.randn(8, 16)
    f = x.to("fpga")
    fpga.host_copy(f).zero_()
    fpga.sync(f[2:4], "from_device")
    host = fpga.host_copy(f)
    assert torch.equal(host[2:4], x[2:4])
    assert torch.equal(host[:2], torch.zeros(2, 16))
    assert torch.equal(host[4:], torch.zeros(4, 16))


def test_device_only_buffers_cannot_be_mapped_or_synced():
    t = fpga.empty([256], torch.float32, device_only=True)
    assert t.device.type == "fpga"
    with pytest.raises(RuntimeError, match="device-only buffer object"):
        fpga.host_copy(t)
    with pytest.raises(RuntimeError, match="device-only buffer object"):
        fpga.sync(t, "from_device")
    with pytest.raises(RuntimeError, match="device-only buffer object"):
        t.cpu()


def test_banks_are_checked_against_the_u55c_hbm():
    assert fpga.HBM_BANKS == 32
    t = fpga.empty([16, 16], torch.float16, bank=31)
    assert fpga.bank_of(t) == 31
    with pytest.raises(ValueError, match="32 HBM pseudo-channels"):
        fpga.empty([16], bank=32)
    with pytest.raises(ValueError, match="32 HBM pseudo-channels"):
        fpga.set_default_bank(-1)
    with fpga.bank(5):
        moved = torch.randn(4, 4).to("fpga")
    assert fpga.bank_of(moved) == 5
    assert fpga.default_bank() == 0
    assert fpga.bank_of(torch.randn(4).to("fpga")) == 0


@pytest.mark.skipif(not emulated(), reason="bank capacity is enforced by the emulation")
def test_a_bank_holds_at_most_512_mib():
    with pytest.raises(RuntimeError, match="HBM bank 3 is full"):
        fpga.empty([(512 << 20) + 1], torch.uint8, bank=3)


@pytest.mark.skipif(not emulated(), reason="loading a file that is not an xclbin needs emulation")
def test_load_records_the_xclbin(tmp_path):
    with pytest.raises(RuntimeError, match="not found"):
        fpga.load(tmp_path / "missing.xclbin")
    path = tmp_path / "memops.xclbin"
    path.write_bytes(b"xclbin2")
    fpga.load(path)
    assert fpga.loaded_xclbin() == str(path)


def run_python(code, **env):
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env)
    environment.pop("TORCH_MEMOPS_FPGA", None)
    environment.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environment,
                          capture_output=True, text=True, timeout=300)


def test_emulation_chosen_explicitly_is_silent():
    result = run_python(
        """
        import warnings, torch, torch_memops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.randn(4).to("fpga")
        print(torch_memops.fpga.backend(), len(caught))
        """,
        TORCH_MEMOPS_FPGA="emulation",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["emulation", "0"]


@pytest.mark.skipif(fpga.is_available(), reason="a card is present: the automatic choice is xrt")
def test_automatic_emulation_gives_a_single_notice():
    result = run_python(
        """
        import warnings, torch, torch_memops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.randn(4).to("fpga")
            torch.randn(4).to("fpga")
        print(torch_memops.fpga.backend())
        print(len(caught), "runs in emulation" in str(caught[0].message))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["emulation", "1", "True"]


@pytest.mark.skipif(fpga.is_available(), reason="a card is present")
def test_forcing_xrt_without_a_card_raises():
    result = run_python("import torch_memops; torch_memops.fpga.backend()",
                        TORCH_MEMOPS_FPGA="xrt")
    assert result.returncode != 0
    assert "no FPGA card" in result.stderr or "built without XRT" in result.stderr


def test_unknown_backend_name_raises():
    result = run_python("import torch_memops; torch_memops.fpga.backend()",
                        TORCH_MEMOPS_FPGA="gpu")
    assert result.returncode != 0
    assert 'TORCH_MEMOPS_FPGA must be "xrt" or "emulation"' in result.stderr


def test_pyxrt_absent_is_said_clearly():
    try:
        import pyxrt  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pyxrt is not importable: it ships with XRT"):
            fpga.devices()
        with pytest.raises(RuntimeError, match="pyxrt is not importable"):
            fpga.board_info()
    else:
        assert isinstance(fpga.devices(), list)


def test_package_exposes_the_fpga_module():
    assert torch_memops.fpga is fpga
    assert fpga.backend() in ("xrt", "emulation")
    assert isinstance(fpga.device_name(), str) and fpga.device_name()
