"""benchmarks/bench_offload.py: its CPU smoke run (every row but transformers' offloaded cache,
which needs CUDA streams) and the spelling of transformers' offloaded cache it picks."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_offload  # noqa: E402


def test_bench_offload_cpu_smoke_writes_its_table(tmp_path):
    result = bench_offload.main(["--cpu-smoke", "--cell", "2x256", "--repeats", "1", "--new-tokens", "2",
                                 "--gather-threads", "1", "--out", str(tmp_path), "--tag=-test"])
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == bench_offload.ROW_NAMES == ["gpu-ours", "offload-ours", "gpu-ours-static",
                                                     "offload-ours-static", "offload-ours-gather", "offload-hf",
                                                     "gpu-stock", "capped-gpu-stock"]
    assert rows["offload-hf"]["status"].startswith("skipped: transformers' offloaded cache needs CUDA")
    for name in ("gpu-stock", "gpu-ours", "capped-gpu-stock", "offload-ours", "gpu-ours-static",
                 "offload-ours-static", "offload-ours-gather"):
        row = rows[name]
        # A noisy CPU may time t(1+n) below t(1); the row then says so instead of reporting it.
        assert row["status"] == "ok" or row["status"].startswith("noise"), (name, row["status"])
        assert row["extra"]["tokens_same_first_and_last_call"], name
        assert len(row["tokens"]) == 2 and all(len(t) == 3 for t in row["tokens"])
        assert row["extra"]["capped"] is False  # no cap on the CPU, and the table says so
    # The offloaded pipeline computes what the all-on-one-device one computes.
    assert result["summary"]["offload_ours_tokens_equal_gpu_ours"] is True
    assert result["summary"]["offload_ours_static_tokens_equal_gpu_ours_static"] is True
    assert result["summary"]["offload_ours_gather_tokens_equal_gpu_ours"] is True
    assert "needs CUDA" in result["cap"]["why"]
    assert result["gather_threads"] == 1 and result["host_gather_gbps"]["1_threads"] > 0
    saved = json.loads((tmp_path / "bench_offload-test.json").read_text())
    assert saved["cell"] == "B2 S256" and saved["environment"]["transformers"]
    table = (tmp_path / "bench_offload-test.md").read_text()
    assert "| offload-ours |" in table and "no cap" in table


def test_transformers_offloaded_cache_is_found():
    model = bench_offload.build_model(bench_offload.TINY, 2, bench_offload.torch.float32, "cpu")
    cache, name = bench_offload.hf_offloaded_cache(model)
    assert name in ("DynamicCache(offloading=True)", "OffloadedCache()")
    assert getattr(cache, "offloading", True)


def test_planner_prediction_reports_both_placements():
    # On the CPU both placements are the CPU; this runs the code that the GPU run uses with "cuda".
    model = bench_offload.build_model(bench_offload.TINY, 4, bench_offload.torch.float32, "cpu")
    args = bench_offload.argparse.Namespace(page_size=16, budget=128, dense_layers=2)
    out = bench_offload.planner_prediction(model, args, bench_offload.Cell(2, 512), bench_offload.torch.float32,
                                           {"gpu-ours": 10.0, "offload-ours-gather": 12.5}, gpu="cpu")
    for name in ("all-gpu", "host-memory"):
        assert set(out[name]) == {"prepare", "relevancy", "retrieval", "apply", "memory_ms"}
        assert out[name]["memory_ms"] > 0
    assert out["measured_extra_ms"] == 2.5
    assert out["predicted_extra_ms"] == round(out["host-memory"]["memory_ms"] - out["all-gpu"]["memory_ms"], 3)
