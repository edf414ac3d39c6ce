"""The method registry. A method is one file (a :class:`Method` subclass) plus one entry here.

>>> from torch_memops.hf.methods import register_method, Method   # doctest: +SKIP
>>> class MyMethod(Method):                                        # doctest: +SKIP
...     name, summary_mode = "mine", "mean"
...     def select(self, inputs): ...
>>> register_method(MyMethod())                                     # doctest: +SKIP
"""

from __future__ import annotations

from typing import Dict

from .base import SUMMARY_REPRESENTATIVES, Method, SelectionInputs
from .dense import Dense
from .mean import MeanKeys
from .mean_head import MeanHead
from .oracle import Oracle, OracleHead
from .quest import Quest
from .quest_head import QuestHead
from .quest_int8 import QuestInt8
from .quest_rerank import QuestRerank
from .quest_topp import QuestTopP, QuestTopPMid
from .random_pages import RandomPages
from .streaming import Streaming

__all__ = ["METHODS", "Method", "SelectionInputs", "get_method", "register_method"]

METHODS: Dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS` under ``method.name``; returns it."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method: expected a Method instance, got {type(method).__name__}")
    if not method.name:
        raise ValueError("register_method: the method has no name")
    if method.summary_mode is not None and method.summary_mode not in SUMMARY_REPRESENTATIVES:
        raise ValueError(f"register_method: summary_mode must be one of {sorted(SUMMARY_REPRESENTATIVES)} or "
                         f"None, got {method.summary_mode!r}")
    if method.name in METHODS and not replace:
        raise ValueError(f"register_method: {method.name!r} is already registered (pass replace=True)")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}") from None


for _method in (Quest(), QuestInt8(), MeanKeys(), Dense(), Oracle(), OracleHead(), QuestHead(), MeanHead(),
                Streaming(), RandomPages(), QuestTopP(),
                QuestTopPMid(), QuestRerank()):
    register_method(_method)
