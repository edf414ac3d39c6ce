"""Accuracy of page selectors against dense attention: ``torch-memops eval`` as a benchmark script.

The harness is :mod:`torch_memops.evaluate` (teacher-forced top-1 agreement, KL and perplexity
against dense attention; passkey retrieval with Wilson intervals; JSON and a plot); this script
takes the same arguments. ``--quick`` runs a smoke-sized plan.

    python benchmarks/bench_accuracy.py --json results/accuracy.json --plot results/accuracy.png
    python benchmarks/bench_accuracy.py --quick
"""

from __future__ import annotations

import sys

from torch_memops import evaluate

QUICK = ["--selectors", "oracle", "quest", "streaming", "--budgets", "128", "--text-contexts", "512", "--steps", "8",
         "--windows", "1", "--sweep-selectors", "--passkey-contexts", "512", "--passkey-depths", "0.5",
         "--passkey-trials", "2"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:
        argv.remove("--quick")
        argv = QUICK + argv
    return evaluate.main(argv)


if __name__ == "__main__":
    sys.exit(main())
