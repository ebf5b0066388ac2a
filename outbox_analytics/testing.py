"""Helpers for testing code that uses outbox-analytics.

    from outbox_analytics.testing import capture

    with capture() as events:
        signup("ada@example.com")          # your code, calling analytics.track()
    events.assert_tracked("Signed Up", plan="pro")

While a capture is on, every client (explicit ones and the module-level
default client, whenever they were built) records the messages it would
have sent into a `MemoryTransport`, and stores and sends nothing: no outbox
file, no thread, no network, whether the kill switch
(OUTBOX_ANALYTICS_DISABLED) is on or not. Captures nest: the innermost one
records. `live()` lets clients store and send for real inside a capture.
The pytest plugin (see `pytest_plugin`) is built on these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .sinks import captures
from .transport import MemoryTransport

__all__ = ["MemoryTransport", "capture", "live"]


@contextlib.contextmanager
def capture() -> Iterator[MemoryTransport]:
    """Record every client's events in memory for the duration of the block."""
    events = MemoryTransport()
    with _capturing_into(events):
        yield events


@contextlib.contextmanager
def live() -> Iterator[None]:
    """Store and send for real inside the block, even within a capture.

    A default client built while a capture was on can never send (it has
    no outbox): inside the block a real one is built from the module
    settings on first use. Clients the caller built under a capture stay
    as they are: build the ones the block needs inside it.
    """
    import outbox_analytics

    default_before = outbox_analytics.default_client
    if default_before is not None and default_before.outbox is None and default_before.config.send:
        outbox_analytics.default_client = None
    try:
        with _capturing_into(None):
            yield
    finally:
        outbox_analytics.default_client = default_before


@contextlib.contextmanager
def _capturing_into(events: MemoryTransport | None) -> Iterator[None]:
    import outbox_analytics

    default_before = outbox_analytics.default_client
    previous = captures.switch(events)
    try:
        yield
    finally:
        captures.switch(previous)
        # A default client built in the block suits only the block (it has
        # no outbox, or it has one when the capture outside forbids it):
        # the next use builds one for what is in force then.
        if outbox_analytics.default_client is not default_before:
            outbox_analytics.default_client = default_before
