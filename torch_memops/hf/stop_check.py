"""Let ``generate()`` queue the next decode step while the GPU still runs the last one.

After every step ``generate()`` asks whether all rows have stopped (``unfinished_sequences.max()
== 0``), a read that waits for the GPU. From that read to the launch of the next step's graph the
host prepares the step (its inputs, the 4D mask, the guards of the compiled forward) and the GPU
idles: on an H200 that gap was 1.5-3 ms of a 7-9 ms token. transformers has the remedy,
``DeferredStopCheck`` (the flag is copied asynchronously and read one step late; a step run past
an EOS is undone with ``Cache.crop``), but enables it for ``"mps"`` only (5.17-5.24).

While an :func:`~torch_memops.hf.enable` context is open, :func:`is_supported` (installed as
``DeferredStopCheck.is_supported``) also accepts a CUDA decode whose cache is a MemopsCache of a
session with ``MemopsConfig.defer_stop_check`` on, under transformers' own rule for the cache:
it can be cropped (the static MemopsCache), or it is not handed back to the caller. Every other
decode (another model, a stock cache, an assistant) gets transformers' own answer.
"""

from __future__ import annotations

from typing import Callable, Optional, Set

_SESSIONS: Set[int] = set()  # id() of the open sessions that defer
_ORIGINAL: Optional[Callable] = None


def _deferred_stop_check():
    """transformers' ``DeferredStopCheck``, or ``None`` in a version without it."""
    from transformers.generation import utils

    return getattr(utils, "DeferredStopCheck", None)


def is_supported(device, cache, cache_is_returned: bool, is_assistant: bool) -> bool:
    session = getattr(cache, "session", None)
    if device.type == "cuda" and not is_assistant and session is not None and id(session) in _SESSIONS:
        return cache.is_croppable or not cache_is_returned
    return _ORIGINAL(device, cache, cache_is_returned, is_assistant=is_assistant)


def register(session) -> None:
    """Defer the stop checks of ``session``'s caches (installs the rule with the first session)."""
    global _ORIGINAL
    check = _deferred_stop_check()
    if check is None:
        return
    if not _SESSIONS:
        _ORIGINAL = check.is_supported
        check.is_supported = staticmethod(is_supported)
    _SESSIONS.add(id(session))


def unregister(session) -> None:
    """Undo :func:`register`; the last session out restores transformers' rule."""
    global _ORIGINAL
    if id(session) not in _SESSIONS:
        return
    _SESSIONS.discard(id(session))
    if not _SESSIONS:
        _deferred_stop_check().is_supported = staticmethod(_ORIGINAL)
        _ORIGINAL = None
