"""pytest plugin (registered through the `pytest11` entry point): the `analytics_events` fixture.

    def test_signup_is_tracked(analytics_events):
        signup("ada@example.com")
        analytics_events.assert_tracked("Signed Up", plan="pro")

During the test, every outbox-analytics client records what it would have
sent instead of storing and sending it (see `outbox_analytics.testing`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import capture
from .transport import MemoryTransport

__all__ = ["analytics_events"]


@pytest.fixture
def analytics_events() -> Iterator[MemoryTransport]:
    """The messages the code under test sent, with find/tracks/assert_* helpers."""
    with capture() as events:
        yield events
