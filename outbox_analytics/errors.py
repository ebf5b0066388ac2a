"""The library's exception tree.

Bad arguments keep Segment's exception types (AssertionError, TypeError,
ValueError, RuntimeError) so that code written for segment-analytics-python
behaves the same. Everything the library itself raises derives from
`OutboxAnalyticsError`.
"""

from __future__ import annotations

__all__ = ["OutboxAnalyticsError", "OutboxError", "OutboxFull"]


class OutboxAnalyticsError(Exception):
    """Base class of the errors this library raises."""


class OutboxError(OutboxAnalyticsError):
    """The outbox file cannot be opened, is not an outbox, or a write failed."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(f"{message}: {path}")
        self.path = path


class OutboxFull(OutboxAnalyticsError):
    """The outbox holds `max_queue_size` pending events; the new one was not stored."""
