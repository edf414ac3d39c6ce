"""torch_memops.hip_runtime: hip-python's API where it is importable (no AMD GPU here: every call
reports an error, which must surface with its name), and a stand-in module for the success path."""

import enum
import sys
import types

import pytest
import torch

from torch_memops import hip_runtime


def test_without_hip_python_everything_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "hip", None)
    assert hip_runtime.hip_module() is None
    count, why = hip_runtime.device_count()
    assert count == 0 and "hip-python is not importable" in why
    with pytest.raises(RuntimeError, match="hip-python is not importable"):
        hip_runtime.HipEventTimer()


def test_real_hip_python_reports_the_missing_device():
    hip = hip_runtime.hip_module()
    if hip is None:
        pytest.skip("hip-python is not importable")
    count, why = hip_runtime.device_count()
    if count:
        pytest.skip("an AMD GPU is present: this test covers the machine without one")
    assert why.startswith("hipGetDeviceCount: hipError")
    with pytest.raises(RuntimeError, match=r"hipEventCreate failed: hipError\w+"):
        hip_runtime.HipEventTimer()
    with pytest.raises(RuntimeError, match=r"hipHostRegister failed: hipError\w+"):
        with hip_runtime.host_register(torch.zeros(64)):
            pass


class FakeError(enum.IntEnum):
    hipSuccess = 0
    hipErrorInvalidValue = 1


def fake_hip(calls):
    hip = types.SimpleNamespace(hipError_t=FakeError, hipHostRegisterDefault=0)
    clock = iter([10.0, 12.5])
    times = {}

    def record(event, stream):
        calls.append(("record", event, stream))
        times[event] = next(clock)
        return (FakeError.hipSuccess,)

    events = iter(["start", "stop"])
    hip.hipGetDeviceCount = lambda: (FakeError.hipSuccess, 2)
    hip.hipEventCreate = lambda: (FakeError.hipSuccess, next(events))
    hip.hipEventRecord = record
    hip.hipEventSynchronize = lambda event: calls.append(("sync", event)) or (FakeError.hipSuccess,)
    hip.hipEventElapsedTime = lambda a, b: (FakeError.hipSuccess, times[b] - times[a])
    hip.hipEventDestroy = lambda event: (FakeError.hipSuccess,)
    hip.hipHostRegister = lambda ptr, n, flags: calls.append(("register", ptr, n)) or (FakeError.hipSuccess,)
    hip.hipHostUnregister = lambda ptr: calls.append(("unregister", ptr)) or (FakeError.hipSuccess,)
    return hip


def test_event_timer_and_host_register_follow_the_hip_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(hip_runtime, "hip_module", lambda: fake_hip(calls))
    assert hip_runtime.device_count() == (2, None)
    timer = hip_runtime.HipEventTimer(stream="s")
    timer.start()
    timer.stop()
    assert timer.seconds() == pytest.approx(2.5e-3), "hipEventElapsedTime gives milliseconds"
    assert calls == [("record", "start", "s"), ("record", "stop", "s"), ("sync", "stop")]
    timer.close()
    tensor = torch.zeros(8, dtype=torch.float64)
    with hip_runtime.host_register(tensor):
        assert calls[-1] == ("register", tensor.data_ptr(), 64)
    assert calls[-1] == ("unregister", tensor.data_ptr())
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        with hip_runtime.host_register(torch.zeros(4, 4).t()):
            pass
