"""Where the host time of MemopsConfig(offload="host") goes: bench_offload's offload row under
cProfile (functions by own and cumulative time), written to --out/offload_cprofile.txt."""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_offload  # noqa: E402


def main():
    out = Path(sys.argv[1])
    argv = ["--rows", "offload-ours", "--no-plan", "--out", str(out), "--tag", "-cprofile", *sys.argv[2:]]
    profiler = cProfile.Profile()
    profiler.enable()
    bench_offload.main(argv)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    (out / "offload_cprofile.txt").write_text(text.getvalue())
    print(text.getvalue()[:6000])


if __name__ == "__main__":
    main()
