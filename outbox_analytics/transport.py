"""Transports: where a batch goes once it is built. HTTP by default; memory for tests.

A transport takes the URL, the request body (JSON, gzipped or not) and the
headers, and answers with a status, headers and a body, like a server would.
`Client(transport=MemoryTransport())` keeps everything the client would have
sent in memory: the outbox, retries and ordering all work as usual, only the
network is replaced.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import threading
from typing import Any, Protocol

__all__ = ["MemoryTransport", "Reply", "Transport"]


@dataclasses.dataclass(frozen=True)
class Reply:
    """A transport's answer to one request."""

    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    text: str = '{"success": true}'


class Transport(Protocol):
    """What the requester needs to send a batch somewhere other than requests."""

    def post(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> Reply: ...


class MemoryTransport:
    """Accepts every batch and keeps its messages, for tests and dry runs.

    `messages` lists what was delivered, in order; `find()` and the
    `assert_*` helpers make test assertions short.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: list[list[dict[str, Any]]] = []

    def post(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> Reply:
        if headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.record(json.loads(body)["batch"])
        return Reply()

    def record(self, batch: list[dict[str, Any]]) -> None:
        with self._lock:
            self._batches.append([dict(message) for message in batch])

    @property
    def batches(self) -> list[list[dict[str, Any]]]:
        with self._lock:
            return [list(batch) for batch in self._batches]

    @property
    def messages(self) -> list[dict[str, Any]]:
        with self._lock:
            return [message for batch in self._batches for message in batch]

    def clear(self) -> None:
        with self._lock:
            self._batches.clear()

    def find(
        self, type: str | None = None, event: str | None = None, **properties: Any
    ) -> list[dict[str, Any]]:
        """Messages of a type (and track event name) whose properties include these values."""
        found = []
        for message in self.messages:
            if type is not None and message.get("type") != type:
                continue
            if event is not None and message.get("event") != event:
                continue
            given = message.get("properties") or message.get("traits") or {}
            if all(given.get(key) == value for key, value in properties.items()):
                found.append(message)
        return found

    def tracks(self, event: str | None = None, **properties: Any) -> list[dict[str, Any]]:
        """Track events, optionally of one name and with these property values."""
        return self.find("track", event, **properties)

    def assert_tracked(self, event: str, **properties: Any) -> dict[str, Any]:
        """The one track event matching; AssertionError (listing what was sent) otherwise."""
        matches = self.tracks(event, **properties)
        if len(matches) != 1:
            sent = [(m.get("type"), m.get("event") or m.get("name")) for m in self.messages]
            raise AssertionError(
                f"expected one track {event!r} with {properties}, found {len(matches)};"
                f" sent: {sent}"
            )
        return matches[0]

    def assert_nothing_sent(self) -> None:
        messages = self.messages
        if messages:
            kinds = [(m.get("type"), m.get("event") or m.get("name")) for m in messages]
            raise AssertionError(f"expected no analytics, {len(messages)} sent: {kinds}")
