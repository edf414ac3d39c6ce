"""Every error path of every backend raises in Python, run in a process of its own.

An error raised by the compiled extension must reach Python as a ``ValueError`` or
``RuntimeError``. A module that carries a C++ runtime of its own (a static libstdc++ next to
the one torch loads, docs/cuda.md "The C++ runtime") instead kills the process (SIGSEGV) or
loses the integers of its messages; in-process tests cannot report that, so each backend's
error cases run here in a child process, whose exit status and per-case results are checked.

The cases are those of ``test_errors.py`` (shape, dtype and device-mix errors; out-of-range
values, under ``set_value_checks(True)`` on device backends) plus each backend's own limits. A
head dim of 16 float32 elements (one 512-bit word) keeps the inputs valid on the fpga too, so
that every case reaches the check it is written for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import devices

import torch_memops  # noqa: F401  (registers the ops)

TESTS = os.path.dirname(os.path.abspath(__file__))
# The children import the torch_memops this process imported (the checkout, or an installed
# wheel) and run in the tests folder, where no source tree can shadow it.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(torch_memops.__file__)))

# The child: runs every case for one device and prints one JSON line per case, flushed, so that
# the parent knows which case was running if the process dies.
CHILD = r"""
import json, re, sys
sys.path.insert(0, sys.argv[2])
import torch
import torch_memops
import test_errors as E

device = sys.argv[1]
E.D = 16  # float32 rows of 64 bytes: valid on the fpga as well

def extra_cases():
    # Each backend's own limits: (id, fn, args, kwargs, regex).
    out = []
    if device == "cuda":
        q = torch.randn(1, 4, 512, device="cuda")
        cache = torch.randn(1, 2, 32, 512, device="cuda")
        out.append(("cuda/apply-head-dim", torch_memops.sparse_apply, (q, cache, cache, None, 16),
                    {}, "head dims D <= 256"))
        out.append(("cuda/topk-head-dim", torch_memops.topk_relevancy,
                    (q, torch.randn(1, 2, 4, 2, 512, device="cuda"), 2), {}, "head dims D <= 256"))
    if device == "fpga":
        f = lambda t: t.to("fpga")
        out.append(("fpga/layout", torch_memops.prepare_memory, (f(torch.randn(1, 1, 8, 8)), 0),
                    {}, "`page_size`"))
        out.append(("fpga/k-limit", torch_memops.topk_relevancy,
                    (f(torch.randn(1, 1, 16)), f(torch.randn(1, 1, 3000, 1, 16)), 2049),
                    {"mode": "dot"}, "`k` must be <= 2048"))
        out.append(("fpga/apply-placement", torch_memops.sparse_apply,
                    (f(torch.randn(1, 2, 16)), f(torch.randn(1, 1, 8, 16)),
                     f(torch.randn(1, 1, 8, 16)), None, 4), {}, "not offered on the fpga"))
        out.append(("fpga/sync-direction", torch.ops.memops_fpga.sync,
                    (f(torch.randn(4)), "sideways"), {}, "`direction`"))
    return out

def cases():
    for name, build, match in E.SHAPE_AND_TYPE_CASES:
        yield (name, *build(E.valid_inputs(device)), match)
    for name, build, match in E.VALUE_CASES:
        yield (name, *build(E.valid_inputs(device)), match)
    others = ["meta", "cpu"] if device != "cpu" else ["meta"]
    for name, build, match in E.DEVICE_MIX_CASES:
        for other in others:
            yield (f"{name}@{other}", *build(E.valid_inputs(device), other), match)
    yield from extra_cases()

torch_memops.set_value_checks(device != "cpu")
for name, fn, args, kwargs, match in cases():
    print(json.dumps({"case": name, "started": True}), flush=True)
    try:
        fn(*args, **kwargs)
        result = {"case": name, "raised": None}
    except Exception as e:  # the type is what is checked
        msg = str(e).splitlines()[0] if str(e) else ""
        result = {"case": name, "raised": type(e).__name__, "message": msg,
                  "matched": re.search(match, str(e)) is not None}
    print(json.dumps(result), flush=True)
print(json.dumps({"done": True}), flush=True)
"""


def fpga_built() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("memops::sparse_apply", "FPGA")


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("MEMOPS_VALUE_CHECKS", None)
    return env


def run_child(code: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env(), cwd=TESTS)


def describe_exit(rc: int) -> str:
    return f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"


def test_probe_raises_value_error_without_preload():
    """The probe of issue 10: on the GPU image it died with SIGSEGV (exit 139)."""
    assert "LD_PRELOAD" not in os.environ or "libstdc++" not in os.environ["LD_PRELOAD"], (
        "run this test without preloading libstdc++: it checks that no preload is needed")
    run = run_child("import torch, torch_memops; "
                    "torch_memops.prepare_memory(torch.randn(1, 1, 8, 8), 0)")
    assert run.returncode == 1, f"{describe_exit(run.returncode)}\n{run.stderr[-2000:]}"
    last = run.stderr.strip().splitlines()[-1]
    assert last == "ValueError: memops.prepare_memory: `page_size` must be > 0, got 0", last


# fpga checks that may come first: its layout limits and the steps it does not offer.
FPGA_OWN_ERRORS = (" on fpga: ", "is not offered on the fpga device")
ERROR_DEVICES = devices() + (["fpga"] if fpga_built() else [])


@pytest.mark.parametrize("device", ERROR_DEVICES)
def test_every_error_path_raises_in_a_subprocess(device):
    run = run_child(CHILD, device, TESTS)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    started = [r["case"] for r in lines if r.get("started")]
    assert run.returncode == 0 and lines and lines[-1] == {"done": True}, (
        f"{device}: the child ended with {describe_exit(run.returncode)} during case "
        f"{started[-1] if started else '(none)'}\n{run.stderr[-3000:]}")
    results = [r for r in lines if "raised" in r]
    assert len(results) == len(started) > 60
    bad = []
    for r in results:
        if r["raised"] not in ("ValueError", "RuntimeError"):
            bad.append(f"{r['case']}: raised {r['raised']}: {r.get('message')}")
        elif not r["matched"] and not (device == "fpga" and any(
                own in r["message"] for own in FPGA_OWN_ERRORS)):
            bad.append(f"{r['case']}: {r['raised']} without the expected text: {r['message']}")
    assert not bad, f"{device}:\n" + "\n".join(bad)
