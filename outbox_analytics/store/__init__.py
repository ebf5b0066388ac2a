"""Storage: the durable outbox in one SQLite file, split by role.

- `schema`: the table (persist-queue's), our columns and indexes, encode/decode;
- `connection`: opening, per-file locks, transactions, fork safety, typed errors;
- `outbox`: append, `batch()`, the cap, counts;
- `group_commit`: with fsync=True, one commit and sync for every thread waiting;
- `lease`: the upload lease, the only object that claims, acks, releases,
  dead-letters or reclaims rows;
- `recovery`: damaged files moved aside under a lock and salvaged;
- `maintenance`: what the operator's commands do.

Only this package imports sqlite3, persistqueue's table layout and msgpack.
"""

from .lease import UploadLease
from .outbox import (
    DEFAULT_MAX_PENDING,
    PATH_ENV,
    Outbox,
    default_directories,
    default_outbox_path,
    fallback_outbox_path,
    record_drops_at_exit,
)
from .schema import Claimed, Head, OutboxStats, Row, encode_message

__all__ = [
    "Claimed",
    "DEFAULT_MAX_PENDING",
    "PATH_ENV",
    "Head",
    "Outbox",
    "OutboxStats",
    "Row",
    "UploadLease",
    "default_directories",
    "default_outbox_path",
    "encode_message",
    "fallback_outbox_path",
    "record_drops_at_exit",
]
