"""enable()'s fused projections (q/k/v and gate/up as one product each): the same tokens and logits
as the separate projections in every supported family, one product in the compiled decode graph,
the model given back as it was, and modules that cannot be fused left alone."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import FAMILIES, FULL_BUDGET, PAGE, prompt, tiny_model  # noqa: E402

from torch_memops import hf  # noqa: E402
from torch_memops.hf import fused_projections  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def count_projection_calls(model):
    """Forward hooks counting calls of every projection that fusion replaces (added after enable()
    fused them: a hook present before would keep the module from being fused)."""
    counts = {"calls": 0}
    handles = [m.register_forward_hook(lambda *_: counts.__setitem__("calls", counts["calls"] + 1))
               for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS]
    return counts, handles


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_projections_give_the_same_tokens_and_logits(family):
    model = tiny_model(family, **({"attention_bias": True} if family == "llama" else {}))
    ids = prompt(batch=2, length=45)
    mask = torch.ones_like(ids)
    before = snapshot(model)
    keys_before = list(model.state_dict())
    config = dict(page_size=PAGE, token_budget=FULL_BUDGET, dense_layers=1)
    with torch.no_grad():
        with hf.enable(model, hf.MemopsConfig(fuse_projections=False, **config)):
            separate = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            separate_logits = model(ids, attention_mask=mask).logits
        with hf.enable(model, hf.MemopsConfig(**config)):
            fused_modules = [m for m in model.modules() if fused_projections.fused_weights(m)]
            counts, handles = count_projection_calls(model)
            fused = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            fused_logits = model(ids, attention_mask=mask).logits
            for h in handles:
                h.remove()
    layers = model.config.num_hidden_layers
    assert len(fused_modules) == 2 * layers, "every attention and MLP module fused"
    assert counts["calls"] == 0, "the fused forward does not call the separate projections"
    assert torch.equal(fused, separate)
    torch.testing.assert_close(fused_logits, separate_logits, rtol=1e-5, atol=1e-5)
    # Given back as it was: the class's forward, parameters of their own with the same values.
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == keys_before
    pointers = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers), "no parameter shares storage with another"
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.is_contiguous(), name


def test_fused_projections_are_views_of_one_weight_inside_enable():
    model = tiny_model("qwen2")  # q/k/v with biases
    attention = model.model.layers[0].self_attn
    with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=FULL_BUDGET)):
        weight = fused_projections.fused_weights(attention)["memops_qkv"]
        assert weight.shape[0] == sum(getattr(attention, n).out_features for n in ("q_proj", "k_proj", "v_proj"))
        base = weight.untyped_storage().data_ptr()
        for name in ("q_proj", "k_proj", "v_proj"):
            linear = getattr(attention, name)
            assert linear.weight.untyped_storage().data_ptr() == base, "a view: no second copy"
            assert linear.bias.untyped_storage().data_ptr() == attention.memops_qkv_bias.untyped_storage().data_ptr()
    assert not fused_projections.fused_weights(attention)


def test_fuse_projections_false_leaves_the_model_alone():
    model = tiny_model("llama")
    with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=FULL_BUDGET, fuse_projections=False)):
        assert not any(fused_projections.fused_weights(m) for m in model.modules())
        assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="fuse_projections must be a bool"):
        hf.MemopsConfig(fuse_projections=1)


def test_a_projection_with_a_hook_keeps_its_module_unfused():
    """A hook (as tensor parallelism and offloading add) would be skipped by the fused product: that
    module keeps its forward and its projections; the others are fused; the tokens are the same."""
    model = tiny_model("llama")
    hooked = model.model.layers[1].self_attn
    calls = []
    handle = hooked.k_proj.register_forward_hook(lambda *_: calls.append(1))
    ids = prompt(length=40)
    with torch.no_grad():
        with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=FULL_BUDGET, fuse_projections=False)):
            want = model.generate(ids, max_new_tokens=4, do_sample=False)
        calls.clear()
        with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=FULL_BUDGET)):
            assert not fused_projections.fused_weights(hooked) and "forward" not in hooked.__dict__
            assert fused_projections.fused_weights(model.model.layers[0].self_attn)
            got = model.generate(ids, max_new_tokens=4, do_sample=False)
    handle.remove()
    assert len(calls) == 4, "the hooked projection ran at the prefill and every decode step"
    assert torch.equal(got, want)


def test_a_forward_of_another_shape_is_not_rewritten():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

        def forward(self, x, y):
            return self.gate_proj(x) * self.up_proj(y)

    class Twice(TwoInputs):
        def forward(self, x, y):
            return self.gate_proj(x) * self.up_proj(x) + self.gate_proj(x)

    for cls in (TwoInputs, Twice):
        module = cls()
        done = fused_projections.fuse(module)
        assert not done.groups and "forward" not in module.__dict__, cls.__name__


def test_the_compiled_decode_graph_has_one_product_per_group():
    """A decode step under torch.compile(fullgraph=True): per layer one product for q/k/v, o, one
    for gate/up and down (4), against 7 unfused; the same tokens either way."""
    from test_hf_static import BACKEND, greedy_loop

    def products(fuse):
        torch._dynamo.reset()
        model = tiny_model("llama")
        seen = []

        def counting_backend(gm, example_inputs):
            seen.append(sum(1 for n in gm.graph.nodes if n.op == "call_function"
                            and n.target is torch._C._nn.linear))
            return torch._dynamo.backends.registry.lookup_backend(BACKEND)(gm, example_inputs)

        config = hf.MemopsConfig(page_size=PAGE, token_budget=3 * PAGE, dense_layers=1, fuse_projections=fuse)
        with hf.enable(model, config) as session:
            forward = torch.compile(model.forward, fullgraph=True, backend=counting_backend)
            tokens = greedy_loop(model, session.new_cache(max_cache_len=72), prompt(length=45), steps=3,
                                 forward=forward)
        return seen, tokens, model.config.num_hidden_layers

    fused, fused_tokens, layers = products(True)
    separate, separate_tokens, _ = products(False)
    assert torch.equal(fused_tokens, separate_tokens)
    lm_head = 1
    assert fused[-1] == 4 * layers + lm_head, fused
    assert separate[-1] == 7 * layers + lm_head, separate
