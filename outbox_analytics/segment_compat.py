"""Segment's `client.queue` and `client.consumers`, as read-only views of what replaces them.

segment-analytics-python keeps events in a `queue.Queue` drained by consumer
threads; code and integration guides check `client.queue.qsize()`,
`.empty()` or `client.consumers[0].is_alive()`. Here the outbox file is the
queue and one uploader thread is the consumer: these views answer the same
questions from them, and refuse the calls that would bypass the outbox.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from .client import Client

__all__ = ["ConsumerView", "QueueView"]


class QueueView:
    """`client.queue`: the outbox's undelivered events, counted like a `queue.Queue`.

    `qsize()` counts the events not yet delivered: pending ones and those in
    flight (a batch being sent is not delivered until the server says so).
    Dead-lettered events are not counted. It reads the file, so it sees
    what every process using the file stored; with a large backlog a count
    takes a while (a few hundred ms for a million rows). With `send=False`,
    the kill switch or a test capture nothing is stored: the queue is empty.
    """

    def __init__(self, client: Client) -> None:
        self._client = client

    @property
    def maxsize(self) -> int:
        """`max_queue_size`: the most undelivered events the outbox holds before refusing more."""
        return self._client.config.max_queue_size

    def qsize(self) -> int:
        stats = self._client.stats()
        return 0 if stats is None else stats.pending + stats.inflight

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self.qsize() >= self.maxsize

    def __repr__(self) -> str:
        return f"<outbox queue view of {self._client.outbox_path or 'nothing (not storing)'}>"

    def put(self, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse("put", "record events with track(), identify() and the other calls")

    def put_nowait(self, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse("put_nowait", "record events with track(), identify() and the other calls")

    def get(self, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse("get", "the uploader takes events; `outbox-analytics export` reads them")

    def get_nowait(self, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse("get_nowait", "the uploader takes events; `outbox-analytics export` reads them")

    def task_done(self) -> NoReturn:
        _refuse("task_done", "the uploader marks events delivered when the server accepts them")

    def join(self) -> NoReturn:
        _refuse("join", "call client.flush() to wait until pending events are delivered")


def _refuse(method: str, instead: str) -> NoReturn:
    raise TypeError(
        f"client.queue.{method}() is not supported: the outbox file is the queue, and"
        f" client.queue only a read-only view of it ({instead})"
    )


class ConsumerView:
    """One of `client.consumers`: the client's uploader, with Segment's consumer attributes."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def is_alive(self) -> bool:
        """Whether the uploader thread runs in this process now (it starts with the first event)."""
        uploader = self._client.uploader
        return uploader is not None and uploader.running

    @property
    def timeout(self) -> float:
        return self._client.config.timeout

    @property
    def retries(self) -> int:
        return self._client.config.max_retries

    @property
    def upload_size(self) -> int:
        return self._client.config.upload_size

    @property
    def upload_interval(self) -> float:
        return self._client.config.upload_interval

    @property
    def on_error(self) -> Any:
        return self._client.config.on_error

    def __repr__(self) -> str:
        return f"<outbox-analytics uploader, {'alive' if self.is_alive() else 'not running'}>"
