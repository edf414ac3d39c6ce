"""One weight read for the projections that share an input: q/k/v of attention, gate/up of the MLP.

At decode a layer's matrix products are memory-bound GEMVs, and small ones read their weights far
below the bandwidth the large ones reach (H200, bf16, Llama-3-8B shapes, batch 1 and 8: q, k and v
as three products 27-30 us a layer, 40 % of the copy peak; as one 17 us, 70 %; gate and up 62 us
as two, 58 as one; ``docs/hf.md``). So inside ``enable()`` each such group is one product over a
weight that holds the group's rows one after the other, and the projections' parameters become
views of it (no second copy of the weights); on exit they are given back as tensors of their own.

The module's forward stays transformers' own: its source is parsed and the group's calls, e.g.
``self.q_proj(hidden_states)``, become slices of one ``F.linear`` computed at the top of the body
(the rest of the forward, cache update and attention call included, is untouched, so it follows
the installed transformers version). A module is left alone, forward and weights, where its code
does not have exactly that shape or a projection is not a plain ``nn.Linear`` of ordinary tensors
(tensor parallel, quantised or offloaded weights).
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# (the projections of one group, in the order their rows are stacked; the fused weight's attribute)
GROUPS: Tuple[Tuple[Tuple[str, ...], str], ...] = (
    (("q_proj", "k_proj", "v_proj"), "memops_qkv"),
    (("gate_proj", "up_proj"), "memops_gate_up"),
)

_FORWARDS: Dict[Tuple[type, Tuple[str, ...]], Optional[Callable]] = {}  # per class: rewritten or None


@dataclass
class FusedGroup:
    module: torch.nn.Module
    names: Tuple[str, ...]
    attribute: str


@dataclass
class FusedProjections:
    """What :func:`fuse` changed, for :func:`unfuse`."""

    groups: List[FusedGroup] = field(default_factory=list)
    patched: List[torch.nn.Module] = field(default_factory=list)


def fuse(model: torch.nn.Module) -> FusedProjections:
    """Fuse every group of projections of ``model`` that can be; see the module docstring."""
    done = FusedProjections()
    for module in model.modules():
        fused_here = []
        for names, attribute in GROUPS:
            if not all(hasattr(module, n) for n in names):
                continue
            forward = _rewritten_forward(type(module), names, attribute)
            if forward is None or not _fusable([getattr(module, n) for n in names]):
                continue
            _fuse_weights(module, names, attribute)
            fused_here.append(FusedGroup(module, names, attribute))
        if fused_here:
            forward = type(module).forward
            for group in fused_here:
                forward = _rewritten_forward(type(module), group.names, group.attribute, base=forward)
            module.forward = forward.__get__(module)
            done.groups += fused_here
            done.patched.append(module)
    return done


def unfuse(done: Optional[FusedProjections]) -> None:
    """Undo :func:`fuse`: the class's forward again, every projection weight a tensor of its own."""
    if done is None:
        return
    for module in done.patched:
        module.__dict__.pop("forward", None)
    for group in done.groups:
        for name in group.names:
            linear = getattr(group.module, name)
            linear.weight.data = linear.weight.data.clone()
            if linear.bias is not None:
                linear.bias.data = linear.bias.data.clone()
        for suffix in ("_weight", "_bias", "_sizes"):
            group.module.__dict__.pop(group.attribute + suffix, None)
    done.groups.clear()
    done.patched.clear()


def _fusable(linears: Sequence[torch.nn.Module]) -> bool:
    first = linears[0].weight
    for linear in linears:
        if (type(linear) is not torch.nn.Linear or getattr(linear, "_hf_hook", None) is not None
                or linear._forward_hooks or linear._forward_pre_hooks):
            return False  # hooks (tensor parallel, offloading) would be skipped by one product
        for t in (linear.weight, linear.bias):
            if t is None:
                continue
            if type(t.data) is not torch.Tensor or t.device != first.device or t.dtype != first.dtype \
                    or t.device.type == "meta" or not t.is_contiguous():
                return False
        if linear.in_features != linears[0].in_features or (linear.bias is None) != (linears[0].bias is None):
            return False
    return True


def _fuse_weights(module: torch.nn.Module, names: Sequence[str], attribute: str) -> None:
    linears = [getattr(module, n) for n in names]
    weight = torch.cat([l.weight.detach() for l in linears])
    bias = torch.cat([l.bias.detach() for l in linears]) if linears[0].bias is not None else None
    sizes = [l.out_features for l in linears]
    start = 0
    for linear, size in zip(linears, sizes):
        linear.weight.data = weight[start:start + size]
        if bias is not None:
            linear.bias.data = bias[start:start + size]
        start += size
    # Plain attributes, not parameters or buffers: the state dict and parameters() stay the model's.
    # A static address, as parameters have, so that a CUDA graph does not copy them in every replay.
    for t in (weight, bias):
        if t is not None and t.is_cuda:
            torch._dynamo.mark_static_address(t)
    module.__dict__[attribute + "_weight"] = weight
    module.__dict__[attribute + "_bias"] = bias
    module.__dict__[attribute + "_sizes"] = sizes


def _rewritten_forward(cls: type, names: Tuple[str, ...], attribute: str,
                       base: Optional[Callable] = None) -> Optional[Callable]:
    """``base`` (default: ``cls.forward``) with each ``self.<name>(x)`` of the group, all on one
    argument ``x`` and each exactly once, replaced by its slice of one product computed first;
    None when the source does not have that shape."""
    key = (cls, names, id(base))
    if key not in _FORWARDS:
        _FORWARDS[key] = _rewrite(base or cls.forward, names, attribute)
    return _FORWARDS[key]


def _rewrite(function: Callable, names: Tuple[str, ...], attribute: str) -> Optional[Callable]:
    source_of = getattr(function, "__memops_source__", None)
    try:
        source = source_of or textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None
    definition = tree.body[0] if tree.body else None
    if not isinstance(definition, ast.FunctionDef):
        return None
    calls: Dict[str, List[ast.Call]] = {n: [] for n in names}
    for node in ast.walk(definition):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in calls
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"
                and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Name)):
            calls[node.func.attr].append(node)
    if any(len(found) != 1 for found in calls.values()):
        return None
    argument = {found[0].args[0].id for found in calls.values()}
    if len(argument) != 1:
        return None
    argument = argument.pop()
    parameters = [a.arg for a in definition.args.args + definition.args.kwonlyargs]
    if argument not in parameters:
        return None  # the input is computed in the body: the product could not come first
    local = f"_{attribute}_outputs"
    for i, name in enumerate(names):
        node = calls[name][0]
        replacement = ast.Subscript(value=ast.Name(id=local, ctx=ast.Load()), slice=ast.Constant(i), ctx=ast.Load())
        _replace_node(definition, node, replacement)
    product = ast.parse(
        f"{local} = torch.nn.functional.linear({argument}, self.{attribute}_weight, "
        f"self.{attribute}_bias).split(self.{attribute}_sizes, dim=-1)").body[0]
    body = definition.body
    first = 1 if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
        else 0
    body.insert(first, product)
    ast.fix_missing_locations(tree)
    module = sys.modules.get(getattr(function, "__module__", None) or "")
    if module is None:
        return None
    namespace = dict(vars(module))
    namespace.setdefault("torch", torch)
    try:
        exec(compile(tree, f"<torch_memops fused {function.__qualname__}>", "exec"), namespace)
    except Exception:  # a decorator or annotation that does not evaluate again: leave it alone
        return None
    rewritten = namespace[definition.name]
    rewritten.__memops_source__ = ast.unparse(tree)  # so that a second group rewrites this one
    rewritten.__module__ = function.__module__
    return rewritten


def _replace_node(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for name, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, name, new)
                return
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if item is old:
                        value[i] = new
                        return


def fused_weights(module: torch.nn.Module) -> Dict[str, Tensor]:
    """The fused weights that :func:`fuse` gave ``module`` (by group attribute); for tests."""
    return {attr: module.__dict__[attr + "_weight"] for _, attr in GROUPS if attr + "_weight" in module.__dict__}
