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

# Rewritten forwards per (class, groups), or None where the class's forward does not have the shape.
_FORWARDS: Dict[Tuple[type, Tuple[Tuple[Tuple[str, ...], str], ...]], Optional[Callable]] = {}


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
        groups = tuple((names, attribute) for names, attribute in GROUPS
                       if all(hasattr(module, n) for n in names)
                       and _fusable([getattr(module, n) for n in names])
                       and _rewritten_forward(type(module), ((names, attribute),)) is not None)
        if not groups:
            continue
        forward = _rewritten_forward(type(module), groups)
        if forward is None:
            continue
        for names, attribute in groups:
            _fuse_weights(module, names, attribute)
            done.groups.append(FusedGroup(module, names, attribute))
        module.forward = forward.__get__(module)  # an instance attribute: the class is untouched
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


def fused_weights(module: torch.nn.Module) -> Dict[str, Tensor]:
    """The fused weights that :func:`fuse` gave ``module``, by group attribute (empty if none)."""
    return {attr: module.__dict__[attr + "_weight"] for _, attr in GROUPS if attr + "_weight" in module.__dict__}


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


def _rewritten_forward(cls: type, groups) -> Optional[Callable]:
    key = (cls, groups)
    if key not in _FORWARDS:
        _FORWARDS[key] = _rewrite(cls.forward, groups)
    return _FORWARDS[key]


def _rewrite(function: Callable, groups) -> Optional[Callable]:
    """``function`` with, for each group, each ``self.<name>(x)`` (all on one parameter ``x`` of
    the function, each exactly once) replaced by its slice of one product computed first; None
    when the source does not have that shape."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    definition = tree.body[0] if tree.body else None
    if not isinstance(definition, ast.FunctionDef):
        return None
    parameters = {a.arg for a in definition.args.args + definition.args.kwonlyargs}
    products = []
    for names, attribute in groups:
        calls = {n: [] for n in names}
        for node in ast.walk(definition):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in calls
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"
                    and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Name)):
                calls[node.func.attr].append(node)
        if any(len(found) != 1 for found in calls.values()):
            return None
        arguments = {found[0].args[0].id for found in calls.values()}
        if len(arguments) != 1 or not arguments <= parameters:
            return None  # apart, or an input computed in the body: the product could not come first
        outputs = f"_{attribute}_outputs"
        for i, name in enumerate(names):
            _replace_node(definition, calls[name][0],
                          ast.Subscript(value=ast.Name(id=outputs, ctx=ast.Load()), slice=ast.Constant(i),
                                        ctx=ast.Load()))
        products.append(ast.parse(
            f"{outputs} = torch.nn.functional.linear({arguments.pop()}, self.{attribute}_weight, "
            f"self.{attribute}_bias).split(self.{attribute}_sizes, dim=-1)").body[0])
    body = definition.body
    first = 1 if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else 0
    body[first:first] = products
    ast.fix_missing_locations(tree)
    module = sys.modules.get(getattr(function, "__module__", None) or "")
    if module is None or vars(module).get("torch") is not torch:
        return None
    defined: dict = {}
    try:
        # The module's own globals (its later patches are seen); the definition lands in `defined`.
        exec(compile(tree, f"<torch_memops fused {function.__qualname__}>", "exec", dont_inherit=True),
             vars(module), defined)
    except Exception:  # a decorator or annotation that does not evaluate again: leave it alone
        return None
    return defined[definition.name]


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
