"""Helpers for testing code that uses outbox-analytics.

    from outbox_analytics.testing import capture

    with capture() as events:
        signup("ada@example.com")          # your code, calling analytics.track()
    events.assert_tracked("Signed Up", plan="pro")

While a capture is on, every client (explicit ones and the module-level
default client, whenever they were built) records the messages it would
have sent into a `MemoryTransport`, and stores and sends nothing: no outbox
file, no thread, no network. The pytest plugin's `analytics_events` fixture
is this, for the length of one test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import client as client_module
from .transport import MemoryTransport

__all__ = ["MemoryTransport", "capture"]


@contextlib.contextmanager
def capture() -> Iterator[MemoryTransport]:
    """Record every client's events in memory for the duration of the block."""
    import outbox_analytics

    previous = client_module._capture
    default_before = outbox_analytics.default_client
    events = MemoryTransport()
    client_module._capture = events
    try:
        yield events
    finally:
        client_module._capture = previous
        # A default client built during the capture has no outbox: let the
        # next use build a real one from the module settings.
        if outbox_analytics.default_client is not default_before:
            outbox_analytics.default_client = default_before
