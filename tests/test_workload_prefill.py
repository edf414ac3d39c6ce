"""``Workload(prefill="random")``: the cache starts with random keys/values and generate() runs
only the last prompt token (the long-context cells of the GPU evidence, whose eager prefill does
not fit). The same prefix reaches every configuration: dense, the pipeline, eager and compiled."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_profile import PAGE, VOCAB, tiny_llama  # noqa: E402
from torch_memops import hf, workload  # noqa: E402

CONTEXT, NEW = 120, 5


@pytest.fixture(scope="module")
def work():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    return workload.Workload(model, ids, "tiny", torch.device("cpu"), "random")


def forward_lengths(model):
    lengths = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids")
        lengths.append((ids if ids is not None else kwargs["inputs_embeds"]).shape[1])

    return lengths, model.model.register_forward_pre_hook(record, with_kwargs=True)


def new_tokens(work, config, path):
    return workload._run(work, config, NEW, None, path)[:, CONTEXT:]


def test_random_prefix_skips_the_prefill_and_is_the_same_for_dense_and_the_pipeline(work):
    lengths, hook = forward_lengths(work.model)
    try:
        dense = new_tokens(work, None, "eager")
        assert lengths == [1] * NEW, "generate() ran only the last prompt token, then one per decode step"
        lengths.clear()
        memops_dense = new_tokens(work, hf.MemopsConfig(method="dense", page_size=PAGE, dense_layers=1), "eager")
        assert lengths == [1] * NEW
    finally:
        hook.remove()
    assert torch.equal(dense, memops_dense), "the pipeline attending every page is the dense model on the same prefix"
    quest = new_tokens(work, hf.MemopsConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1), "eager")
    assert quest.shape == dense.shape and not torch.equal(quest, dense), "a sparse budget on random keys changes tokens"


def test_the_cache_holds_random_layers_prefix(work):
    kwargs = workload._cache_kwargs(work, NEW, "eager")
    cache = kwargs[hf.cache_argument(work.model)]
    dtype = next(work.model.parameters()).dtype
    want = list(workload.random_layers(work.model, work.batch, CONTEXT - 1, dtype, work.device))
    assert len(cache.layers) == len(want) == work.model.config.num_hidden_layers
    for layer, (keys, values) in zip(cache.layers, want):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    assert not torch.equal(want[0][0], want[1][0]), "each layer gets its own random keys"


def test_compiled_paths_give_the_eager_tokens_and_report_compiled(work):
    quest = hf.MemopsConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1)
    for config in (None, quest):
        eager = new_tokens(work, config, "eager")
        report = workload.profile_run(work, config, NEW, label="x", path="compiled", warmup=False)
        assert report["path"]["decode"] == "compiled" and report["workload"]["prefill"] == "random"
        assert torch.equal(new_tokens(work, config, "compiled"), eager)


def test_unknown_prefill_is_refused():
    with pytest.raises(ValueError, match="prefill must be one of"):
        workload.Workload(torch.nn.Linear(1, 1), torch.zeros(1, 1, dtype=torch.long), "x", torch.device("cpu"),
                          "fake")


def test_the_first_forward_on_a_prefix_is_the_prefill_of_the_report(work):
    """The one-token first forward on a random prefix is what generate() calls its prefill: its
    steps belong to the prefill, and a compiled decode (no hooks) reports no decode steps."""
    quest = hf.MemopsConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1)
    eager = workload.profile_run(work, quest, NEW, label="x", warmup=False, sample_every=1)
    sparse_layers = work.model.config.num_hidden_layers - 1
    assert eager["phases"]["prefill"]["step_calls"]["relevancy"] == sparse_layers
    assert eager["phases"]["decode"]["step_calls"]["relevancy"] == sparse_layers * (NEW - 1)
    compiled = workload.profile_run(work, quest, NEW, label="x", path="compiled", sample_every=1)
    assert compiled["path"]["decode"] == "compiled" and not compiled["path"]["decode_steps_observed"]
    assert compiled["phases"]["prefill"]["step_calls"]["relevancy"] == sparse_layers
