"""An outbox's counts in Prometheus's text exposition format.

For node_exporter's textfile collector (`outbox-analytics status PATH
--prometheus > dir/outbox.prom`) or any scraper. Every metric carries a
`path` label, so that one file can hold the metrics of several outboxes.
"""

from __future__ import annotations

from collections.abc import Iterable

from .store import OutboxStats

__all__ = ["prometheus_text"]

_PREFIX = "outbox_analytics_"
# name, type, help, how to read the value from the stats
_METRICS = (
    ("pending", "gauge", "Events waiting to be sent (with those a dead uploader left in flight).",
     lambda s: s.pending),
    ("inflight", "gauge", "Events a live uploader is sending now.", lambda s: s.inflight),
    ("dead", "gauge", "Events the server rejected, kept in the dead-letter state.",
     lambda s: s.dead),
    ("dropped", "counter", "Events that could not be stored (outbox full, disk errors).",
     lambda s: s.dropped),
    ("oldest_pending_age_seconds", "gauge", "Age of the oldest pending event (0 when none).",
     lambda s: s.oldest_pending_age_s or 0.0),
    ("file_bytes", "gauge", "Size of the outbox file and its write-ahead log.",
     lambda s: s.file_bytes),
    ("uploader_alive", "gauge", "1 while a process holds the outbox's upload lease.",
     lambda s: int(s.uploader_alive)),
)  # fmt: skip


def prometheus_text(all_stats: Iterable[OutboxStats]) -> str:
    """The exposition text for one or more outboxes, ending with a newline."""
    all_stats = list(all_stats)
    lines = []
    for name, kind, help_text, value_of in _METRICS:
        # A counter's samples (and so its HELP and TYPE lines) end in _total.
        sample = _PREFIX + name + ("_total" if kind == "counter" else "")
        lines.append(f"# HELP {sample} {help_text}")
        lines.append(f"# TYPE {sample} {kind}")
        for stats in all_stats:
            lines.append(f'{sample}{{path="{_label(stats.path)}"}} {_number(value_of(stats))}')
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A label value, escaped as the format requires: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))
