"""Stopping abandoned work between windows: a stop flag the caller sets and long loops check.

The HTTP service runs each request's rerank in its worker thread inside :func:`interruptible`; when the
client goes away it sets the flag, and the reranker, which calls :func:`check` before each window, stops
there instead of reading windows no one will see. Outside such a block :func:`check` does nothing.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Interrupted", "check", "interruptible"]

_STOP: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "attn_rerank_stop", default=None
)


class Interrupted(RuntimeError):
    """The work was stopped because whoever asked for it is gone."""


@contextmanager
def interruptible(stop: threading.Event) -> Iterator[None]:
    """Within the block, :func:`check` raises :class:`Interrupted` once ``stop`` is set."""
    token = _STOP.set(stop)
    try:
        yield
    finally:
        _STOP.reset(token)


def check() -> None:
    """Raise :class:`Interrupted` if the current work's stop flag is set."""
    stop = _STOP.get()
    if stop is not None and stop.is_set():
        raise Interrupted("stopped: the caller is gone")
