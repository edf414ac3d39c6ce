"""The package as a user imports it."""

import os
import subprocess
import sys


def test_import_first_thing_in_a_fresh_interpreter(tmp_path):
    # `import torch_memops` before `import torch` must work: _C links against libtorch.
    code = (
        "import torch_memops, torch\n"
        "print(torch._C._dispatch_has_kernel_for_dispatch_key('memops::sparse_apply', 'CPU'))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
