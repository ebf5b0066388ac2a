"""Delivery: the outbox's rows to the server, in order, acknowledged only after a 2xx.

One object per job, each owning its invariants:

- `worker.BackgroundWorker`: the thread. At most one per uploader and
  process runs steps; it is started again after it died and in a forked
  child (checked by pid on entry, so a C-level fork counts too); `stop()`
  is for good; an idle thread stands down around a Python fork.
- `lease_holder.LeaseHolder`: the upload lease and the batch claimed ahead,
  changed only inside a turn (its one lock), by the thread, `drain()` and
  sync sends alike. A batch claimed ahead never overtakes a row released.
- `schedule`: pure decisions in monotonic time (`next_delay`,
  `head_backoff`); times written to the file come from a wall clock that
  moves with the monotonic one, so a stepped clock changes nothing here.
- `rounds.Rounds`: the only caller of ack, release and dead-letter. Every
  row it claims is settled exactly once; acks only after a 2xx for it.
- `sender.Sender`: one body, retried by the tenacity policy; only the
  interruption its caller passes in cuts it short (the thread's stop never
  ends a `drain()` or a sync send). The requester belongs to one process.
- `triage`: a pure verdict on a split batch's rejections: the events'
  fault (dead-lettered) or the endpoint's (they stay pending).
- `flushing`: `flush()` waits for whoever sends, `drain()` sends here;
  both read progress from the file and time on the monotonic clock.
- `sync.deliver_now`: sync_mode, beside any other sender of the file.
- `peers`: the other clients of this process on the same file (by identity).
- `uploader.Uploader`: the facade the client uses.

Only this package uses both the outbox and the requester.
"""

from .sender import DEFAULT_RETRY_WAIT
from .uploader import FlushResult, Uploader

__all__ = ["DEFAULT_RETRY_WAIT", "FlushResult", "Uploader"]
