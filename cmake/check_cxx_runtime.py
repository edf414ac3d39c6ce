"""Post-link check of the torch_memops module (cmake/cxx_runtime.cmake): an error that the module
raises, with an integer formatted into its message, must reach Python as a ValueError.

It does not when the module carries a C++ runtime of its own (a static libstdc++ next to the
shared one torch loaded): the process then dies with SIGSEGV on the first bad argument. Run as
``python check_cxx_runtime.py <path of _C*.so>``; exit status 0 when the module is sound.
"""

import shutil
import subprocess
import sys

PROBE = """
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    torch.ops.memops.prepare_memory(torch.randn(1, 1, 8, 8), 0)
except ValueError as e:
    assert "got 0" in str(e), str(e)
    print("ok")
"""


def defined_symbols(path: str, marker: str) -> list[str]:
    """Dynamic symbols of the module containing `marker` that it defines itself."""
    nm = shutil.which("nm")
    if nm is None:
        return []
    out = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True)
    return [line.split()[-1] for line in out.stdout.splitlines() if marker in line]


def main() -> int:
    path = sys.argv[1]
    # Only a static libstdc++ / libgomp brings these along.
    symbols = defined_symbols(path, "_ZNSt6locale")
    openmp = defined_symbols(path, "GOMP_parallel")
    if openmp:
        print(f"torch_memops: warning: {path} defines {openmp[0]}: it embeds a static libgomp, an "
              "OpenMP runtime of its own next to torch's (threads are not shared)",
              file=sys.stderr)
    run = subprocess.run([sys.executable, "-c", PROBE, path], capture_output=True, text=True,
                         timeout=300)
    if run.returncode == 0 and run.stdout.strip() == "ok" and not symbols:
        return 0
    how = (f"killed by signal {-run.returncode}" if run.returncode < 0
           else f"exit status {run.returncode}")
    print(f"torch_memops: the built module {path} is unusable: an error it raises does not reach "
          f"Python as an exception (probe: {how}).", file=sys.stderr)
    if symbols:
        print(f"It defines {len(symbols)} std::locale symbols (e.g. {symbols[0]}): it embeds a "
              "static libstdc++, a second C++ runtime next to the one torch loads.",
              file=sys.stderr)
    print("Build with a compiler whose shared libstdc++.so exists (e.g. CXX=/usr/bin/g++), or "
          "see docs/cuda.md (\"The C++ runtime\"). Probe output:\n" + run.stdout + run.stderr,
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
