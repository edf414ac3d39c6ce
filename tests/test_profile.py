"""torch_memops.profile: the breakdown adds up, the JSON schema, energy readers, paths, outputs (CPU)."""

import json
import sys
import time
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch_memops import hf, profile  # noqa: E402
from torch_memops.profile import MEMORY_STEPS, Profiler  # noqa: E402

VOCAB = 97
PAGE = 8
NEW_TOKENS = 7


def tiny_llama(layers=4):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2,
                                      head_dim=16, max_position_embeddings=1024, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def profiled_generate(placement=None, meters=None, length=150, sync=False, through_session=False):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))
    config = hf.MemopsConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1, placement=placement or {})
    with hf.enable(model, config) as session:
        cache = None if through_session else session.new_cache()
        with Profiler(label="tiny", meters=meters, sync=sync) as prof:
            prof.attach(session if through_session else cache)
            kwargs = {} if through_session else {hf.cache_argument(model): cache}
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, do_sample=False,
                                     logits_processor=[prof.token_clock()], return_dict_in_generate=True, **kwargs)
        if through_session:
            assert "new_cache" not in vars(session), "the session is restored when the profiler exits"
            cache = getattr(out, "cache", None) or out.past_key_values  # the one generate() made
    return prof, cache


class LinearMeter(profile.EnergyMeter):
    """A fake counter of a device drawing a constant power: joules = watts * host time."""

    source = "fake"

    def __init__(self, device, watts):
        super().__init__(device)
        self.watts, self.available, self.reason = watts, True, ""

    def read(self):
        return self.watts * time.perf_counter()


@pytest.mark.parametrize("through_session", [False, True], ids=["cache", "session"])
def test_breakdown_adds_up_per_phase_layer_and_token(through_session):
    prof, cache = profiled_generate(through_session=through_session)
    report = prof.report()
    profile.validate_report(report)
    decode = report["phases"]["decode"]
    assert decode["tokens"] == NEW_TOKENS - 1
    assert report["path"]["decode"] == "eager" and report["path"]["decode_steps_observed"]
    # Every sparse layer ran prepare, relevancy and apply at every decode token; layer 0 is dense.
    assert decode["step_calls"] == {"prepare": 3 * (NEW_TOKENS - 1), "relevancy": 3 * (NEW_TOKENS - 1),
                                    "apply": 3 * (NEW_TOKENS - 1), "dense": NEW_TOKENS - 1}
    layers = report["per_layer_s"]["decode"]
    assert set(layers["0"]) == {"dense"}
    assert all(set(layers[str(i)]) == {"prepare", "relevancy", "apply"} for i in (1, 2, 3))
    for step in ("prepare", "relevancy", "apply"):
        assert decode["steps_s"][step] == pytest.approx(sum(layers[str(i)][step] for i in (1, 2, 3)), rel=1e-12)
        assert decode["steps_s"][step] > 0
    assert decode["steps_s"]["retrieval"] == 0.0, "memory and apply on one device: retrieval is fused into apply"
    per_token = decode["per_token_ms"]
    parts = sum(per_token[s] for s in MEMORY_STEPS) + per_token["rest_of_model"]
    assert parts == pytest.approx(per_token["total"], rel=1e-9)
    assert 0 < decode["memory_processing_pct"] < 100
    assert report["phases"]["prefill"]["steps_s"]["prepare"] > 0
    run = report["run"]
    assert run["memory_processing_s"] + run["rest_of_model_s"] == pytest.approx(run["time_s"], rel=1e-9)
    assert run["time_s"] >= report["phases"]["prefill"]["time_s"] + decode["time_s"]
    # The hooks are detached when the context ends.
    assert all(layer.profile is None for layer in cache.layers)


def test_report_round_trips_as_json_and_validation_catches_breaks():
    prof, _ = profiled_generate()
    report = json.loads(json.dumps(prof.report()))
    profile.validate_report(report)
    broken = json.loads(json.dumps(report))
    broken["phases"]["decode"]["rest_of_model_s"] += 1.0
    with pytest.raises(ValueError, match="phases.decode: steps \\+ rest"):
        profile.validate_report(broken)
    del broken["energy"]
    with pytest.raises(ValueError, match="key 'energy' is missing"):
        profile.validate_report(broken)


def test_report_before_exit_raises():
    prof = Profiler()
    with pytest.raises(RuntimeError, match="has not been exited"):
        prof.report()


def test_measured_energy_is_apportioned_by_step_time():
    prof, _ = profiled_generate(meters={"cpu": LinearMeter("cpu", watts=10.0)})
    report = prof.report()
    energy = report["energy"]
    cpu = energy["by_device"]["cpu"]
    assert cpu["source"] == "fake"
    # The counter is read right after the clock at each boundary: microseconds apart, but a shared
    # 2-core CI host once put 70 us between them (0.1 % of the run); 0.5 ms of host time is allowed.
    slack = dict(rel=1e-3, abs=10.0 * 5e-4)
    assert cpu["total_j"] == pytest.approx(10.0 * report["run"]["time_s"], **slack)
    decode = report["phases"]["decode"]
    assert cpu["phases"]["decode"]["energy_j"] == pytest.approx(10.0 * decode["time_s"], **slack)
    assert cpu["phases"]["decode"]["memory_processing_j"] == pytest.approx(
        10.0 * decode["memory_processing_s"], **slack)
    assert energy["decode_j_per_token"] == pytest.approx(10.0 * decode["time_s"] / decode["tokens"],
                                                         rel=1e-3, abs=slack["abs"] / decode["tokens"])
    assert energy["memory_processing_pct"] == pytest.approx(
        100.0 * energy["memory_processing_j"] / energy["total_j"], rel=1e-9)


class CountingMeter(LinearMeter):
    def __init__(self, device, watts):
        super().__init__(device, watts)
        self.reads = 0

    def read(self):
        self.reads += 1
        return super().read()


def test_energy_counters_are_read_per_phase_not_per_token():
    """Three reads whatever the number of tokens (start, end of the prefill, end): a counter read is a
    driver call (NVML) that every token of a host-bound decode would pay."""
    meter = CountingMeter("cpu", watts=10.0)
    prof, _ = profiled_generate(meters={"cpu": meter})
    assert meter.reads == 3
    assert prof.report()["phases"]["decode"]["tokens"] == NEW_TOKENS - 1 > 2


def make_powercap(root, zones):
    for name, (label, value, top) in zones.items():
        zone = root / name
        zone.mkdir(parents=True)
        (zone / "name").write_text(label + "\n")
        (zone / "energy_uj").write_text(f"{value}\n")
        (zone / "max_energy_range_uj").write_text(f"{top}\n")


def test_rapl_reads_packages_and_handles_the_wrap(tmp_path):
    make_powercap(tmp_path, {"intel-rapl:0": ("package-0", 1_000_000, 5_000_000),
                             "intel-rapl:0:0": ("core", 10, 5_000_000),
                             "intel-rapl:1": ("package-1", 2_000_000, 5_000_000)})
    meter = profile.RaplEnergy(tmp_path)
    assert meter.available, meter.reason
    assert meter.read() == 0.0
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("1500000\n")
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("500000\n")  # wrapped past 5 000 000
    assert meter.read() == pytest.approx(0.5 + 3.5)


def test_rapl_degrades_when_absent_or_unreadable(tmp_path):
    missing = profile.RaplEnergy(tmp_path / "none")
    assert not missing.available and "does not exist" in missing.reason
    with pytest.raises(RuntimeError, match="does not exist"):
        missing.read()
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").mkdir()  # reading it fails the way a root-only file does for a user
    (zone / "max_energy_range_uj").write_text("100\n")
    unreadable = profile.RaplEnergy(tmp_path)
    assert not unreadable.available and "not readable" in unreadable.reason
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no RAPL package zone" in profile.RaplEnergy(empty).reason


def fake_pynvml(fail_with=None, millijoules=12_345):
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        if fail_with:
            raise NVMLError(fail_with)

    module.NVMLError = NVMLError
    module.nvmlInit = init
    module.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)
    module.nvmlDeviceGetHandleByPciBusId = lambda bus: ("handle", bus)
    module.nvmlDeviceGetTotalEnergyConsumption = lambda handle: millijoules
    return module


def test_nvml_degrades_without_driver_and_reads_millijoules(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a real GPU is present: the fake NVML would shadow it")
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_with="Driver Not Loaded"))
    meter = profile.NvmlEnergy("cuda:0")
    assert not meter.available and meter.reason == "NVML: Driver Not Loaded"
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(millijoules=12_345))
    meter = profile.NvmlEnergy("cuda:0")
    assert meter.available and meter.read() == pytest.approx(12.345)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: the ctypes path, no driver here
    meter = profile.NvmlEnergy("cuda:0")
    assert not meter.available and ("nvidia-ml-py" in meter.reason or meter.reason.startswith("NVML"))


def test_compiled_decode_is_reported_as_compiled_not_as_eager():
    """Token boundaries but no step hooks during decode (a captured graph): the report says so."""
    target = types.SimpleNamespace(is_compileable=True, profile=None)
    with Profiler(label="graph", energy=False) as prof:
        prof.attach(target)
        assert target.profile is prof
        with prof.step("prefill", "prepare", [torch.device("cpu")]):
            pass
        for _ in range(4):
            prof.mark_token()
    report = prof.report()
    profile.validate_report(report)
    assert report["path"]["decode"] == "compiled"
    assert not report["path"]["decode_steps_observed"]
    assert "per-step breakdown is not" in report["path"]["note"]
    assert "not observed" in profile.render_table([report], use_rich=False)


def test_steps_are_not_recorded_while_compiling(monkeypatch):
    with Profiler(energy=False) as prof:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        with prof.step("decode", "apply", [torch.device("cpu")]):
            pass
        prof.moved(torch.ones(4), torch.device("meta"))
        monkeypatch.undo()
        prof.mark_token()
    assert prof.report()["phases"]["decode"]["step_calls"] == {}
    assert prof.report()["bytes_moved"] == {}


def test_declared_path_wins():
    with Profiler(energy=False) as prof:
        prof.set_path("compiled", forward_compiled=True)
        prof.mark_token()
        prof.mark_token()
    path = prof.report()["path"]
    assert path["decode"] == "compiled" and path["forward_compiled"] is True


def test_profiler_overhead_is_small_and_reported():
    prof, _ = profiled_generate(length=300)
    overhead = prof.report()["overhead"]
    # Its own bookkeeping: a few microseconds per step against steps of tens of microseconds on
    # this tiny model; the 5 % target is for real models, whose steps are far longer.
    assert 0 < overhead["pct_of_run"] < 5.0


def test_fpga_placement_counts_bytes_and_labels_the_energy_model():
    if not hf.fpga_available():
        pytest.skip("torch_memops.fpga is not importable or torch.device('fpga') is not registered")
    prof, _ = profiled_generate(placement={"prepare": "fpga", "relevancy": "fpga", "retrieval": "cpu",
                                           "apply": "cpu"})
    report = prof.report()
    profile.validate_report(report)
    assert "fpga:0" in report["per_device_s"]["decode"]
    assert set(report["per_device_s"]["decode"]["fpga:0"]) == {"prepare", "relevancy"}
    assert set(report["per_device_s"]["decode"]["cpu"]) == {"apply", "dense"}
    moved = report["bytes_moved"]
    # Per decode token, per sparse layer: the query to the FPGA ([2, 6, 16] float32) ...
    assert moved["cpu->fpga:0"]["decode_per_token"] >= 3 * 2 * 6 * 16 * 4
    # ... and the selection back (int32 [2, 2, 4]).
    assert moved["fpga:0->cpu"]["decode_per_token"] == 3 * 2 * 2 * 4 * 4
    fpga = report["energy"]["by_device"]["fpga:0"]
    assert fpga["source"].startswith("model: ") and "assumed" in fpga["model"]["basis"]
    assert "emulation" in report["devices"]["fpga:0"]["timing"] or "xrt" in report["devices"]["fpga:0"]["timing"]


def test_tables_plain_and_rich():
    prof, _ = profiled_generate()
    report = prof.report()
    plain = profile.render_table([report], use_rich=False)
    for word in (*MEMORY_STEPS, "rest of model", "memory processing", "path: decode eager", "profiler overhead"):
        assert word in plain
    pytest.importorskip("rich")
    assert "relevancy" in profile.render_table([report], use_rich=True)


def test_png_has_one_bar_per_configuration(tmp_path):
    pytest.importorskip("matplotlib")
    prof, _ = profiled_generate()
    report = prof.report()
    other = json.loads(json.dumps(report))
    other["label"] = "other"
    path = tmp_path / "breakdown.png"
    profile.save_png([report, other], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compiled_generate_is_reported_as_compiled():
    """generate() with the static cache under torch.compile(fullgraph=True): the hooks must not break
    the graph, prefill steps are still timed (eager), and decode is reported compiled, not eager."""
    torch._dynamo.reset()
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 45), generator=torch.Generator().manual_seed(1))
    compile_config = transformers.CompileConfig(fullgraph=True, backend="aot_eager")
    compile_config._compile_all_devices = True
    with torch.no_grad(), hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=3 * PAGE,
                                                           dense_layers=1)) as session:
        with Profiler(energy=False) as prof:
            prof.attach(session)
            model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static",
                           compile_config=compile_config, logits_processor=[prof.token_clock()])
    assert hasattr(model, "_compiled_call"), "generate() took its compiled path"
    report = prof.report()
    profile.validate_report(report)
    assert report["path"]["decode"] == "compiled" and report["path"]["cache_compileable"] is True
    assert not report["path"]["decode_steps_observed"]
    assert report["phases"]["prefill"]["steps_s"]["prepare"] > 0
    assert report["phases"]["decode"]["tokens"] == 4 and report["phases"]["decode"]["time_s"] > 0


def test_measured_overhead_compares_alternated_decode_times():
    from torch_memops import workload

    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 120), generator=torch.Generator().manual_seed(1))
    work = workload.Workload(model, ids, "tiny", torch.device("cpu"))
    config = hf.MemopsConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1)
    result = workload.measured_overhead(work, config, new_tokens=5, repeats=3)
    plain, profiled = result["plain_ms_per_token"], result["profiled_ms_per_token"]
    assert len(plain) == len(profiled) == 3 and min(plain + profiled) > 0
    ratios = sorted(b / a for a, b in zip(plain, profiled))
    assert result["overhead_pct"] == pytest.approx(100.0 * (ratios[1] - 1.0))
    pairs = result["pair_overhead_pct"]
    assert pairs == pytest.approx([100.0 * (b / a - 1.0) for a, b in zip(plain, profiled)])
    assert result["spread_pct"] == [min(pairs), max(pairs)] and result["warmup_runs"] == 2
    assert result["sampling"] == {"every": "auto", "decode_tokens": 4, "timed_tokens": result["sampling"]["timed_tokens"]}
    assert len(result["sampling"]["timed_tokens"]) == 3 and all(1 <= n <= 4 for n in result["sampling"]["timed_tokens"])
    even = workload.measured_overhead(work, config, new_tokens=4, repeats=2, sample_every=1, warmup=False)
    assert even["overhead_pct"] == pytest.approx(sum(even["pair_overhead_pct"]) / 2), "median of two: their mean"
    assert even["warmup_runs"] == 0 and even["sampling"]["timed_tokens"] == [3, 3]
    assert even["timed_vs_untimed_token_pct"] == [], "every token timed: no untimed neighbours to compare"
    halves = workload.measured_overhead(work, config, new_tokens=5, repeats=1, sample_every=2, warmup=False)
    assert halves["sampling"]["timed_tokens"] == [2] and len(halves["timed_vs_untimed_token_pct"]) == 1
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        workload.measured_overhead(work, config, new_tokens=4, repeats=0)


# -- per-step timing on a sample of the decode tokens ------------------------------------------------


def manual_run(tokens, layers=3, sample_every=1, step_s=0.0005, **kwargs):
    """A manual loop: per token, ``layers`` timed steps on the host and one counted copy."""
    cpu = torch.device("cpu")
    with Profiler(energy=False, sample_every=sample_every, **kwargs) as prof:
        hooks = [prof.for_layer(i) for i in range(layers)]
        for hook in hooks:  # the prefill
            with hook.step("prefill", "prepare", [cpu]):
                time.sleep(step_s)
        prof.mark_token()
        for _ in range(tokens):
            for hook in hooks:
                with hook.step("decode", "relevancy", [cpu]):
                    time.sleep(step_s)
                hook.moved(torch.ones(4), torch.device("meta"))
            prof.mark_token()
    return prof, prof.report()


@pytest.mark.parametrize("every, timed", [(1, list(range(7))), (3, [0, 3, 6]), (4, [0, 4]), (10, [0])])
def test_every_nth_token_is_timed_and_the_steps_stand_for_all_tokens(every, timed):
    prof, report = manual_run(7, sample_every=every)
    profile.validate_report(report)
    sampling, decode = report["sampling"], report["phases"]["decode"]
    assert sampling["timed"] == timed and sampling["timed_tokens"] == len(timed)
    assert decode["tokens"] == sampling["decode_tokens"] == 7
    assert sampling["step_scale"] == pytest.approx(7 / len(timed))
    assert decode["step_calls"] == {"relevancy": 3 * len(timed)}, "only the timed tokens' steps were recorded"
    assert report["phases"]["prefill"]["step_calls"] == {"prepare": 3}, "the prefill is always timed"
    recorded = sum(s for (phase, *_), s in prof._seconds.items() if phase == "decode")
    assert decode["steps_s"]["relevancy"] == pytest.approx(recorded * 7 / len(timed), rel=1e-12)
    layers = report["per_layer_s"]["decode"]
    assert sum(layers[str(i)]["relevancy"] for i in range(3)) == pytest.approx(decode["steps_s"]["relevancy"])
    assert sum(report["per_device_s"]["decode"]["cpu"].values()) == pytest.approx(decode["steps_s"]["relevancy"])
    # The mean over the timed tokens: about 3 sleeps per token whatever the sampling.
    assert decode["per_token_ms"]["relevancy"] >= 3 * 0.5
    per_token = decode["per_token_ms"]
    assert sum(per_token[s] for s in MEMORY_STEPS) + per_token["rest_of_model"] == pytest.approx(per_token["total"])
    # Bytes are counted on every token, timed or not.
    assert report["bytes_moved"]["cpu->meta"]["decode"] == 7 * 3 * 16
    assert (sampling["untimed_token_ms"] is None) == (len(timed) == 7)
    assert "per-step timing: " + f"{len(timed)} of 7 decode tokens" in profile.render_table([report], use_rich=False)


def test_sample_every_one_is_the_unsampled_profiler():
    """N = 1 (the default): every decode token timed, sums unscaled, the report as before sampling."""
    prof, report = manual_run(5)
    assert Profiler().sample_every == 1
    assert report["sampling"]["step_scale"] == 1.0 and report["sampling"]["timed"] == [0, 1, 2, 3, 4]
    recorded = sum(s for (phase, *_), s in prof._seconds.items() if phase == "decode")
    assert report["phases"]["decode"]["steps_s"]["relevancy"] == recorded  # exactly: no scaling at all
    assert report["phases"]["decode"]["step_calls"] == {"relevancy": 15}


def test_auto_sampling_keeps_the_profilers_cost_within_its_budget(monkeypatch):
    """Make each timed step cost 2 ms more (sync=True with a slow synchronisation before and after,
    the first on the profiler's own clock, the second only in the token's time): auto then times
    only as many tokens as its budget allows, spread over the run, first token included, and
    prices a timed token by what it measurably costs, not only by its own clock."""
    def slow_sync(devices):
        time.sleep(0.001)

    monkeypatch.setattr(profile, "_synchronize", slow_sync)
    prof, report = manual_run(40, sample_every="auto", sync=True, overhead_budget_pct=20.0)
    profile.validate_report(report)
    sampling, overhead = report["sampling"], report["overhead"]
    timed = sampling["timed"]
    assert sampling["every"] == "auto" and sampling["budget_pct"] == 20.0
    assert timed[0] == 0 and 2 <= len(timed) < 40, timed
    assert max(timed) >= 20, f"timed tokens are spread over the run, not bunched at its start: {timed}"
    # What timing cost, from the token times: the timed tokens' excess over the untimed ones.
    decode = report["phases"]["decode"]
    excess_ms = len(timed) * (sampling["timed_token_ms"] - sampling["untimed_token_ms"])
    cost_pct = 100.0 * excess_ms / (1e3 * decode["time_s"])
    # The controller predicts one timed token ahead: it may overshoot by about one token's cost.
    assert cost_pct <= 30.0, (cost_pct, sampling)
    assert overhead["pct_of_decode"] < cost_pct, "its own clock sees only part of the cost"
    # With every token timed the same run spends far more than the budget on itself.
    _, every = manual_run(40, sample_every=1, sync=True)
    assert every["overhead"]["pct_of_decode"] > 30.0, every["overhead"]


@pytest.mark.parametrize("kwargs, match", [({"sample_every": 0}, "sample_every must be an int >= 1 or 'auto'"),
                                           ({"sample_every": "half"}, "sample_every must be"),
                                           ({"sample_every": True}, "sample_every must be"),
                                           ({"overhead_budget_pct": 0}, "overhead_budget_pct must be")])
def test_bad_sampling_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Profiler(**kwargs)


def test_validation_catches_an_inconsistent_sampling():
    _, report = manual_run(6, sample_every=2)
    profile.validate_report(report)
    broken = json.loads(json.dumps(report))
    broken["sampling"]["step_scale"] = 1.0
    with pytest.raises(ValueError, match="step_scale must be decode_tokens / timed_tokens"):
        profile.validate_report(broken)
    broken = json.loads(json.dumps(report))
    broken["sampling"]["timed"].append(5)
    with pytest.raises(ValueError, match="sampling must time"):
        profile.validate_report(broken)
    old = json.loads(json.dumps(report))
    del old["sampling"]  # a report from before sampling existed still validates
    profile.validate_report(old)


def test_sampled_generate_breakdown_adds_up():
    """A real generate() with every 2nd of 6 decode tokens timed: tokens 0, 2, 4."""
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 150), generator=torch.Generator().manual_seed(1))
    config = hf.MemopsConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1)
    with hf.enable(model, config) as session, Profiler(energy=False, sample_every=2) as prof:
        prof.attach(session)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, do_sample=False, logits_processor=[prof.token_clock()])
    report = prof.report()
    profile.validate_report(report)
    decode = report["phases"]["decode"]
    assert report["sampling"]["timed"] == [0, 2, 4] and report["sampling"]["step_scale"] == 2.0
    assert decode["step_calls"] == {"prepare": 3 * 3, "relevancy": 3 * 3, "apply": 3 * 3, "dense": 3}
    assert decode["tokens"] == NEW_TOKENS - 1 and report["path"]["decode"] == "eager"
    assert 0 < decode["memory_processing_pct"] < 100


def test_profile_run_warms_up_with_the_same_length(monkeypatch):
    from torch_memops import workload

    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(1))
    work = workload.Workload(model, ids, "tiny", torch.device("cpu"))
    config = hf.MemopsConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1)
    lengths = []
    generate = workload._generate

    def counting(workload_, new_tokens, *args, **kwargs):
        lengths.append(new_tokens)
        return generate(workload_, new_tokens, *args, **kwargs)

    monkeypatch.setattr(workload, "_generate", counting)
    for cfg in (None, config):
        lengths.clear()
        report = workload.profile_run(work, cfg, 5, label="x")
        assert lengths == [5, 5], "one unreported warm-up generate of the same length, then the profiled one"
        assert report["warmup"]["runs"] == 1 and report["warmup"]["new_tokens"] == 5
        assert report["warmup"]["reported"] is False and "not reported" in report["warmup"]["how"]
        assert report["sampling"]["every"] == "auto"
    lengths.clear()
    assert workload.profile_run(work, config, 5, label="x", warmup=False)["warmup"]["runs"] == 0
    assert lengths == [5]


def test_a_layer_hook_resolves_its_steps_again_in_a_new_run_and_after_a_new_placement():
    class Layer:
        pass

    cpu = torch.device("cpu")
    layer = Layer()
    layer.devices = {"relevancy": cpu}
    prof = Profiler(energy=False)
    hook = prof.for_layer(5, layer)
    for run in range(2):
        with prof:
            for _ in range(3 + run):
                with hook.step("decode", "relevancy", {cpu}):
                    pass
            prof.mark_token()
            prof.mark_token()
        assert prof.report()["phases"]["decode"]["step_calls"] == {"relevancy": 3 + run}, "a new run starts at zero"
    layer.devices = {"relevancy": torch.device("meta")}  # a re-initialised cache: a new placement dict
    with prof:
        with hook.step("decode", "relevancy", {cpu}):
            pass
        prof.mark_token()
    assert set(prof.report()["per_device_s"]["decode"]) == {"meta"}


def fresh_compiled_setup():
    """A tiny model, a prompt and a CPU compile config, with dynamo's caches and counters reset."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_config = transformers.CompileConfig(fullgraph=True, backend="aot_eager")
    compile_config._compile_all_devices = True
    return tiny_llama(), torch.randint(0, VOCAB, (1, 45), generator=torch.Generator().manual_seed(1)), compile_config


def test_sampling_does_not_recompile_the_compiled_decode():
    """The timed/untimed switch flips between tokens: a captured graph must never guard on it
    (one graph), and the decode is still reported compiled."""
    model, ids, compile_config = fresh_compiled_setup()
    with torch.no_grad(), hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=3 * PAGE,
                                                           dense_layers=1)) as session:
        with Profiler(energy=False, sample_every=2) as prof:
            prof.attach(session)
            model.generate(ids, max_new_tokens=7, do_sample=False, cache_implementation="static",
                           compile_config=compile_config, logits_processor=[prof.token_clock()])
    report = prof.report()
    profile.validate_report(report)
    assert report["path"]["decode"] == "compiled" and not report["path"]["decode_steps_observed"]
    assert report["sampling"]["timed"] == [0, 2, 4]
    # A guard on the switch would recompile at the first flip: a second graph.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(torch._dynamo.utils.counters["stats"])


def test_attaching_a_profiler_does_not_recompile_the_compiled_decode():
    """A compiled decode made without a profiler is reused when one is attached, and again when
    another one is (the warm-up of profile_run has none): the graph must not guard on which profiler
    object the cache layers hold (it did: a recompile in the first profiled decode token)."""
    model, ids, compile_config = fresh_compiled_setup()
    outputs = []
    with torch.no_grad(), hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=3 * PAGE,
                                                           dense_layers=1)) as session:
        def run(prof=None):
            processors = []
            if prof is not None:
                prof.attach(session)
                processors.append(prof.token_clock())
            outputs.append(model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static",
                                          compile_config=compile_config, logits_processor=processors))

        run()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for _ in range(2):
            with Profiler(energy=False) as prof:
                run(prof)
            assert prof.report()["path"]["decode"] == "compiled"
    assert graphs >= 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, dict(torch._dynamo.utils.counters["stats"])
    assert all(torch.equal(out, outputs[0]) for out in outputs)
