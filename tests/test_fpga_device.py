"""The fpga device (DispatchKey::FPGA on XRT buffer objects): copies, views, printing and the
CPU fallback behave like the same code on the CPU, bit for bit."""

import copy

import pytest
import torch

import torch_memops  # noqa: F401  (registers the fpga device)

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
]


def random_tensor(shape, dtype):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_round_trip_is_bit_exact(dtype):
    x = random_tensor((5, 7, 33), dtype)
    f = x.to("fpga")
    assert f.device == torch.device("fpga", 0)
    assert f.dtype == dtype and f.shape == x.shape
    back = f.cpu()
    assert back.device.type == "cpu"
    assert torch.equal(back, x)


def test_non_contiguous_source_and_strided_views():
    x = torch.randn(12, 20)
    f = x.t().to("fpga")
    assert torch.equal(f.cpu(), x.t())
    g = x.to("fpga")
    assert torch.equal(g[3:9, ::3].cpu(), x[3:9, ::3])
    assert torch.equal(g[:, 5].cpu(), x[:, 5])
    assert torch.equal(g.t().cpu(), x.t())
    assert torch.equal(g.view(4, 60).cpu(), x.view(4, 60))
    assert torch.equal(g.reshape(240).cpu(), x.reshape(240))


def test_write_into_strided_view_keeps_the_other_elements():
    x = torch.randn(10, 16)
    f = x.to("fpga")
    patch = torch.randn(4, 8)
    f[2:6, ::2] = patch
    expected = x.clone()
    expected[2:6, ::2] = patch
    assert torch.equal(f.cpu(), expected)


def test_empty_zeros_full_and_fill():
    e = torch.empty(3, 40, device="fpga", dtype=torch.float16)
    assert e.device.type == "fpga" and e.shape == (3, 40) and e.dtype == torch.float16
    s = torch.empty_strided((4, 6), (1, 4), device="fpga")
    assert s.stride() == (1, 4)
    assert torch.equal(torch.zeros(4, 9, device="fpga").cpu(), torch.zeros(4, 9))
    assert torch.equal(torch.full((3, 3), 2.5, device="fpga").cpu(), torch.full((3, 3), 2.5))
    f = torch.randn(6, 8).to("fpga")
    f[1:4].fill_(-3.0)
    assert torch.equal(f[1:4].cpu(), torch.full((3, 8), -3.0))
    assert torch.empty(0, device="fpga").cpu().numel() == 0


def test_repr_shows_the_values_and_the_device():
    x = torch.randn(3, 4)
    text = repr(x.to("fpga"))
    assert "device='fpga:0'" in text
    assert repr(x).replace(")", "") in text


def test_arithmetic_through_the_cpu_fallback():
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    fa, fb = a.to("fpga"), b.to("fpga")
    result = fa * 2 + fb
    assert result.device.type == "fpga"
    assert torch.equal(result.cpu(), a * 2 + b)
    assert torch.equal((fa @ fb.t()).cpu(), a @ b.t())
    assert torch.equal(fa.sum(dim=1).cpu(), a.sum(dim=1))
    fa.add_(1.0)
    assert torch.equal(fa.cpu(), a + 1.0)
    assert torch.equal(fa.to(torch.float16).cpu(), (a + 1.0).to(torch.float16))


def test_item_clone_and_resize():
    x = torch.randn(4, 5)
    f = x.to("fpga")
    assert f[2, 3].item() == x[2, 3].item()
    c = f.clone()
    f.zero_()
    assert torch.equal(c.cpu(), x)
    r = x.reshape(-1).to("fpga")
    r.resize_(40)
    assert r.shape == (40,)
    assert torch.equal(r[:20].cpu(), x.reshape(-1))
    grown = torch.empty(0, device="fpga")
    grown.resize_(7)
    grown.fill_(1.5)
    assert torch.equal(grown.cpu(), torch.full((7,), 1.5))


def test_copy_between_fpga_tensors():
    x = torch.randn(9, 32)
    f = x.to("fpga")
    g = torch.empty(9, 32, device="fpga")
    g.copy_(f)  # same dtype and layout: a device-to-device buffer copy
    assert torch.equal(g.cpu(), x)
    h = torch.empty(32, 9, device="fpga").t()
    h.copy_(f)  # strided destination: staged through the host
    assert torch.equal(h.cpu(), x)
    row = torch.randn(32)
    h.copy_(row)  # broadcast from the CPU
    assert torch.equal(h.cpu(), row.expand(9, 32))
    assert torch.equal(torch.empty(9, 32).copy_(f[0]), x[0].expand(9, 32))


def test_only_device_zero_exists():
    with pytest.raises(RuntimeError, match="fpga:0"):
        torch.empty(3, device="fpga:1")


# --- torch.save / torch.load and copy.deepcopy ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32], ids=str)
def test_save_and_load_round_trip_through_the_device(dtype, tmp_path):
    x = (torch.randn(4, 6) * 100).to(dtype)
    f = x.to("fpga")
    view = f[:, 1:5]
    path = tmp_path / "t.pt"
    torch.save({"whole": f, "view": view}, path)
    loaded = torch.load(path)
    assert loaded["whole"].device.type == "fpga" and loaded["view"].device.type == "fpga"
    assert torch.equal(loaded["whole"].cpu(), x) and torch.equal(loaded["view"].cpu(), x[:, 1:5])
    # The view still shares the loaded storage, as it did before saving.
    shared = loaded["view"].untyped_storage().data_ptr()
    assert shared == loaded["whole"].untyped_storage().data_ptr()
    on_cpu = torch.load(path, map_location="cpu")
    assert on_cpu["whole"].device.type == "cpu" and torch.equal(on_cpu["whole"], x)


def test_deepcopy_makes_an_independent_fpga_copy():
    x = torch.randn(3, 8)
    f = x.to("fpga")
    state = {"a": f, "b": f[1:], "grad": torch.randn(2).to("fpga").requires_grad_()}
    copied = copy.deepcopy(state)
    assert copied["a"].device.type == "fpga" and torch.equal(copied["a"].cpu(), x)
    assert torch.equal(copied["b"].cpu(), x[1:]) and copied["grad"].requires_grad
    assert copied["b"].untyped_storage().data_ptr() == copied["a"].untyped_storage().data_ptr()
    assert copied["a"].untyped_storage().data_ptr() != f.untyped_storage().data_ptr()
    copied["a"].fill_(7.0)
    assert torch.equal(f.cpu(), x)  # the original is untouched
    # A loaded or copied tensor is an ordinary fpga tensor for the memops kernels.
    keys = torch.randn(1, 2, 32, 16)
    summary = torch_memops.prepare_memory(copy.deepcopy(keys.to("fpga")), 8)
    assert torch.equal(summary.cpu(), torch_memops.prepare_memory(keys, 8))
