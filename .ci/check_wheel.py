"""Checks a torch_memops wheel: exactly one compiled _C, built for this interpreter, and the
wheel installed alone in a fresh virtual environment (torch from the system site-packages)
imports and runs every op correctly.

    python3 .ci/check_wheel.py dist/torch_memops-*.whl
"""

import importlib.machinery
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

SMOKE = r"""
import doctest, sys
import torch_memops
from torch_memops import ops
assert torch_memops.__file__.startswith(sys.prefix), torch_memops.__file__
assert torch_memops._C.__file__.startswith(sys.prefix), torch_memops._C.__file__
result = doctest.testmod(ops, extraglobs={"torch": __import__("torch")})
assert result.failed == 0 and result.attempted >= 6, result
print(f"wheel OK: {torch_memops._C.__file__}, {result.attempted} doctest examples passed")
"""


def main(wheel: str) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    compiled = [n for n in names if n.startswith("torch_memops/_C")]
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    assert compiled == [f"torch_memops/_C{suffix}"], (
        f"{wheel}: expected exactly torch_memops/_C{suffix}, found {compiled}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env_dir = Path(tmp) / "venv"
        venv.create(env_dir, system_site_packages=True, with_pip=True)
        python = str(env_dir / "bin" / "python")
        # --ignore-installed: a torch_memops of the same version in the system site-packages
        # (visible through --system-site-packages) would otherwise count as installed.
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--ignore-installed", wheel], check=True)
        # Run from the temporary folder, so that the checkout's sources cannot be imported.
        subprocess.run([python, "-c", SMOKE], check=True, cwd=tmp)


if __name__ == "__main__":
    main(sys.argv[1])
