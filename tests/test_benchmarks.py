"""The benchmarks' own logic: the zero-copy mapping of our cache onto FlashInfer's paged KV, the
FlashInfer rows of bench_decode/bench_ops, bench_e2e's floor math and its CPU smoke run.

FlashInfer does not run here; ``paged_decode_torch`` computes what FlashInfer's paged decode
computes from the mapped page table, so that the mapping (views, page ids, last-page lengths)
is checked against ``reference.sparse_apply`` on the CPU. On a GPU with FlashInfer the
benchmarks compare FlashInfer's own output with ours on the same pages.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from torch_memops import reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_e2e  # noqa: E402
import flashinfer_paged as fi  # noqa: E402
import trace_e2e  # noqa: E402


def ascending_pages(B, H, N, k, num_pages):
    """Ascending unique page indices [B, H, k] among the first num_pages[b] pages, -1 padded."""
    rows = []
    for b in range(B):
        n = int(num_pages[b])
        for _ in range(H):
            take = min(k, n)
            pages = torch.randperm(n)[:take].sort().values
            rows.append(torch.cat([pages, torch.full((k - take,), -1)]))
    return torch.stack(rows).view(B, H, k).int()


def test_paged_view_is_the_same_memory():
    keys = torch.randn(2, 3, 64, 8)
    pages = fi.paged_view(keys, 16)
    assert pages.shape == (2 * 3 * 4, 16, 1, 8)
    assert pages.data_ptr() == keys.data_ptr()
    # Page (b * Hkv + h) * N + i holds tokens i*P .. i*P+P-1 of row b, head h.
    assert torch.equal(pages[(1 * 3 + 2) * 4 + 3, :, 0], keys[1, 2, 48:64])


def test_paged_view_refuses_what_would_copy():
    with pytest.raises(ValueError, match="multiple of page_size"):
        fi.paged_view(torch.randn(1, 1, 20, 8), 16)
    with pytest.raises(ValueError, match="contiguous"):
        fi.paged_view(torch.randn(1, 1, 64, 16)[..., :8], 16)
    with pytest.raises(ValueError, match=r"\[B, Hkv, S, D\]"):
        fi.paged_view(torch.randn(64, 8), 16)


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (6, 2), (4, 4), (7, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mapped_page_table_gives_sparse_apply(Hq, Hkv, dtype):
    B, P, D, N, k = 3, 16, 32, 9, 4
    S = N * P
    keys = torch.randn(B, Hkv, S, D, dtype=dtype)
    values = torch.randn(B, Hkv, S, D, dtype=dtype)
    query = torch.randn(B, Hq, D, dtype=dtype)
    seq_lens = torch.tensor([S, S - 5, 2 * P + 1], dtype=torch.int32)  # full, partial last page, 3 pages
    num_pages = (seq_lens + P - 1) // P
    indices = ascending_pages(B, Hkv, N, k, num_pages)
    indices[2, 0] = torch.tensor([0, 2, -1, -1])  # selects the partial last page, padded
    indices[1, -1] = torch.tensor([num_pages[1] - 1, -1, -1, -1], dtype=torch.int32)
    indices[1, -1, 0] = -1  # a request with no page at all
    indptr, ids, last = fi.page_table(indices, N, P, seq_lens)
    out, lse = fi.paged_decode_torch(fi.grouped_query(query, Hkv), fi.paged_view(keys, P), fi.paged_view(values, P),
                                     indptr, ids, last)
    # The reference in float32 on the same (rounded) inputs: the mapping is what is tested here.
    want_out, want_lse = reference.sparse_apply(query.float(), keys.float(), values.float(), indices, P,
                                                seq_lens=seq_lens)
    torch.testing.assert_close(out.view(B, Hq, D), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.view(B, Hq), want_lse, rtol=1e-5, atol=1e-5)
    assert int(last[2 * Hkv]) == 1 and int(indptr[-1]) == int((indices >= 0).sum())


def test_full_page_table_is_dense_decode():
    B, Hq, Hkv, P, D, N = 2, 8, 2, 16, 16, 5
    keys, values = torch.randn(B, Hkv, N * P, D), torch.randn(B, Hkv, N * P, D)
    query = torch.randn(B, Hq, D)
    indptr, ids, last = fi.full_page_table(B, Hkv, N, P, "cpu")
    out, _ = fi.paged_decode_torch(fi.grouped_query(query, Hkv), fi.paged_view(keys, P), fi.paged_view(values, P),
                                   indptr, ids, last)
    want, _ = reference.sparse_apply(query, keys, values, None, P)
    torch.testing.assert_close(out.view(B, Hq, D), want, rtol=1e-5, atol=1e-5)


def test_bound_scores_force_sink_and_recent_pages_and_match_reference_scores():
    B, Hq, Hkv, P, D, N = 2, 8, 2, 16, 16, 12
    keys = torch.randn(B, Hkv, N * P, D)
    query = torch.randn(B, Hq, D)
    summary = reference.prepare_memory(keys, P)
    scores = fi.bound_scores(query, summary, sink_pages=1, recent_pages=2)
    assert torch.isinf(scores[..., [0, N - 2, N - 1]]).all() and not torch.isinf(scores[..., 1:N - 2]).any()
    # The selection of the scores equals topk_relevancy's (bound, GQA max, same forced pages).
    k = 6
    top = scores.topk(k, dim=-1).indices.sort(-1).values.int()
    _, want = reference.topk_relevancy(query, summary, k, sink_pages=1, recent_pages=2)
    assert torch.equal(top, want)


def test_compare_outputs_flags_a_wrong_output():
    truth = torch.randn(2, 4, 8)
    close = truth + 1e-3 * torch.randn_like(truth)
    assert fi.compare_outputs(close, close, truth)["agree"]
    assert not fi.compare_outputs(truth + 0.5, close, truth)["agree"]


def test_e2e_floor_bytes_count_weights_and_kv():
    model = bench_e2e.build_model(bench_e2e.TINY, 4, torch.bfloat16, "cpu")
    config = model.config
    embedding = config.vocab_size * config.hidden_size * 2
    params = sum(p.numel() for p in model.parameters()) * 2
    assert bench_e2e.weight_bytes(model, 3) == params - embedding + 3 * config.hidden_size * 2
    per_token_layer = 2 * config.num_key_value_heads * config.head_dim * 2
    assert bench_e2e.kv_bytes_dense(config, 2, 512, 2) == 4 * 2 * 512 * per_token_layer
    memops = bench_e2e.hf.MemopsConfig(page_size=16, token_budget=128, dense_layers=1)
    # 1 dense layer in full; 3 sparse layers read a min/max summary (2 rows per page) + 128 tokens.
    sparse = bench_e2e.kv_bytes_sparse(config, 2, 512, 2, memops)
    summary = 2 * config.num_key_value_heads * 2 * 32 * config.head_dim * 2
    assert sparse == 2 * 512 * per_token_layer + 3 * (summary + 2 * 128 * per_token_layer)


def test_cells_parse():
    assert bench_e2e.parse_cells("1x32K,8x32k 2x512") == [bench_e2e.Cell(1, 32768), bench_e2e.Cell(8, 32768),
                                                           bench_e2e.Cell(2, 512)]
    with pytest.raises(SystemExit, match="8x32K"):
        bench_e2e.parse_cells("8-32K")


class _FakeDecodeWrapper:
    """FlashInfer's BatchDecodeWithPagedKVCacheWrapper as its documentation describes it, computed
    by paged_decode_torch: plan() stores the table (copied into the user's buffers in CUDA-graph
    mode, so that run() reads whatever is in them then), run() returns out and a base-2 lse."""

    def __init__(self, workspace, layout, use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None):
        assert layout == "NHD" and workspace.dtype == torch.uint8
        self.graph = use_cuda_graph
        self.buffers = (paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer)

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
             q_data_type, kv_data_type, sm_scale):
        assert num_kv_heads == 1 and indptr.dtype == indices.dtype == last_page_len.dtype == torch.int32
        if self.graph:
            self.buffers[0].copy_(indptr)
            self.buffers[1][:len(indices)].copy_(indices)
            self.buffers[2].copy_(last_page_len)
            self.table = self.buffers
        else:
            self.table = (indptr, indices, last_page_len)
        self.heads, self.scale = num_qo_heads, sm_scale

    def run(self, q, paged_kv_cache, return_lse=False):
        keys, values = paged_kv_cache
        assert q.shape[1] == self.heads and keys.shape[2] == 1
        out, lse = fi.paged_decode_torch(q, keys, values, *self.table, scale=self.scale)
        out = out.to(q.dtype)
        return (out, lse / torch.log(torch.tensor(2.0))) if return_lse else out


@pytest.fixture
def fake_flashinfer(monkeypatch):
    import types

    module = types.ModuleType("flashinfer")
    module.__version__ = "fake"
    module.BatchDecodeWithPagedKVCacheWrapper = _FakeDecodeWrapper
    module.top_k = lambda scores, k: scores.topk(k, dim=-1)  # unsorted is allowed; topk's order is fine
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    return module


def test_flashinfer_decode_glue_on_selected_pages(fake_flashinfer):
    B, Hq, Hkv, P, D, N, k = 2, 8, 2, 16, 32, 10, 4
    keys, values = torch.randn(B, Hkv, N * P, D), torch.randn(B, Hkv, N * P, D)
    query = torch.randn(B, Hq, D)
    indices = ascending_pages(B, Hkv, N, k, [N] * B)
    decode = fi.FlashInferDecode(query, keys, values, P, *fi.page_table(indices, N, P), use_tensor_cores=True)
    out, _ = decode.run()
    want, _ = reference.sparse_apply(query, keys, values, indices, P)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert fi.flashinfer_version() == "fake"


def test_flashinfer_pipeline_glue_is_the_quest_step(fake_flashinfer):
    B, Hq, Hkv, P, D, N, k = 2, 8, 2, 16, 32, 12, 5
    keys, values = torch.randn(B, Hkv, N * P, D), torch.randn(B, Hkv, N * P, D)
    query = torch.randn(B, Hq, D)
    summary = reference.prepare_memory(keys, P)
    step = fi.flashinfer_pipeline(query, summary, keys, values, P, k, sink_pages=1, recent_pages=2,
                                  use_tensor_cores=False, compile=False)
    _, indices = reference.topk_relevancy(query, summary, k, sink_pages=1, recent_pages=2)
    want, _ = reference.sparse_apply(query, keys, values, indices, P)
    torch.testing.assert_close(step(), want, rtol=1e-5, atol=1e-5)
    # New data in the same buffers: the step follows it (what a replayed graph sees).
    query.copy_(torch.randn_like(query))
    _, indices = reference.topk_relevancy(query, summary, k, sink_pages=1, recent_pages=2)
    want, _ = reference.sparse_apply(query, keys, values, indices, P)
    torch.testing.assert_close(step(), want, rtol=1e-5, atol=1e-5)


class _Rows:
    """Stands in for common.Report: collects the rows a benchmark adds."""

    def __init__(self):
        self.rows = []

    def add(self, row):
        self.rows.append(row)
        return row


@pytest.fixture
def cpu_timing(monkeypatch, fake_flashinfer):
    """The benchmarks' FlashInfer rows on the CPU: one untimed call instead of CUDA timing and
    graphs, the fake FlashInfer, torch.compile left out (its CPU compile is slow and not the point)."""
    import bench_decode
    import bench_ops

    for module in (bench_decode, bench_ops):
        monkeypatch.setattr(module, "median_ms", lambda fn: (fn(), 1.0)[1])
        monkeypatch.setattr(module, "graph_replay", lambda fn: fn)
    monkeypatch.setattr(fi.torch, "compile", lambda fn, **kwargs: fn)
    return bench_decode, bench_ops


def test_bench_decode_flashinfer_rows_run_and_agree(cpu_timing):
    bench_decode, _ = cpu_timing
    B, Hq, Hkv, D, S, kp = 2, 8, 2, 64, 512, 8
    keys = torch.randn(B, Hkv, S, D, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    query = torch.randn(B, Hq, D, dtype=torch.bfloat16)
    summary = reference.prepare_memory(keys, bench_decode.PAGE)
    report = _Rows()
    assert bench_decode.flashinfer_dense_row(report, "cell", query, keys, values, True) == 1.0
    bench_decode.flashinfer_rows(report, "cell", query, summary, keys, values, kp, 1, 1.0, True)
    assert [r.name.split(",")[0] for r in report.rows] == [
        "FlashInfer dense decode", "FlashInfer decode",
        "FlashInfer pipeline (compiled scoring + flashinfer.top_k + decode)"]
    assert all("skipped" not in r.extra for r in report.rows), [r.extra for r in report.rows]
    assert report.rows[1].extra["agree"] and report.rows[1].extra["fi_err"] < 1e-2


def test_bench_ops_flashinfer_rows_run_and_agree(cpu_timing):
    _, bench_ops = cpu_timing
    B, Hq, Hkv, D, S, kp = 2, 8, 2, 64, 512, 8
    keys = torch.randn(B, Hkv, S, D, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    query = torch.randn(B, Hq, D, dtype=torch.bfloat16)
    idx = bench_ops.random_pages(B, Hkv, S // bench_ops.PAGE, kp, device="cpu")
    scores = torch.randn(B, Hkv, S // bench_ops.PAGE)
    report = _Rows()
    bench_ops.flashinfer_attention_rows(report, "cell", query, keys, values, idx, scores, kp, kp * bench_ops.PAGE)
    assert len(report.rows) == 4 and all("skipped" not in r.extra for r in report.rows), [r.extra for r in report.rows]
    assert report.rows[1].extra["agree"]


def test_bench_e2e_cpu_smoke_writes_its_table(tmp_path):
    result = bench_e2e.main(["--cpu-smoke", "--cells", "2x256", "--rows", "stock-dynamic,ours-eager", "--repeats", "1",
                             "--new-tokens", "2", "--out", str(tmp_path), "--tag=-test"])
    rows = {row["row"]: row for row in result["rows"]}
    assert set(rows) == {"stock-dynamic", "ours-eager"}
    for row in rows.values():
        # A noisy CPU may time t(1+n) below t(1); the row then says so instead of reporting it.
        assert row["status"] == "ok" or row["status"].startswith("noise"), row["status"]
        assert row["extra"]["tokens_same_first_and_last_call"] and row["extra"]["graphs_compiled_while_timed"] == 0
        assert len(row["tokens"]) == 2 and all(len(t) == 3 for t in row["tokens"])
    cell = result["cells"]["B2 S256"]
    assert 0 < cell["floor_sparse_ms"] <= cell["floor_dense_ms"]
    saved = json.loads((tmp_path / "bench_e2e-test.json").read_text())
    assert saved["rows"][0]["cell"] == "B2 S256" and saved["environment"]["transformers"]
    assert "| B2 S256 |" in (tmp_path / "bench_e2e-test.md").read_text()


def test_trace_e2e_cpu_smoke_reports_each_row(tmp_path):
    result = trace_e2e.main(["--cpu-smoke", "--rows", "stock-dynamic,ours-eager", "--out", str(tmp_path), "--tag=-t"])
    rows = {row["row"]: row for row in result["rows"]}
    assert set(rows) == {"stock-dynamic", "ours-eager"}
    for row in rows.values():
        assert row["status"] == "ok", row["status"]
        # CPU: no CUDA kernels; the host-side counters still exist.
        assert row["extra"]["kernels_per_token"] == 0 and row["extra"]["profiled_wall_ms_per_token"] > 0
    assert "| B2 S512 | ours-eager |" in (tmp_path / "trace_e2e-t.md").read_text()
