"""Fresh random data every run, reproducible on demand.

Each test seeds torch from the session seed and its own name. The session seed is random unless
``MEMOPS_TEST_SEED`` is set; it is printed in pytest's header, so a failure can be replayed with
``MEMOPS_TEST_SEED=<seed> pytest ...``.
"""

import os
import random
import sys
import zlib
from collections import Counter

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from every test module

SESSION_SEED = int(os.environ.get("MEMOPS_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    from helpers import devices

    return [f"memops test seed: MEMOPS_TEST_SEED={SESSION_SEED}", f"memops devices: {devices()}"]


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))


def pytest_configure(config):
    # Emitted inside torch by torch.compile's own use of torch.jit; nothing this project calls.
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    )


def pytest_terminal_summary(terminalreporter):
    # Always, also under -q: what was skipped and why (missing tools say how to install them).
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons = Counter()
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    terminalreporter.section("memops: skipped tests, by reason")
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:5d} skipped: {reason}")
