"""What a track() costs, counted rather than timed (issue 25): the work is the same on any machine.

A plain event is copied without the path bookkeeping that only a warning
needs, and gives the same message as the full cleaning; a batch's rows are
inserted a few statements at a time, not one statement per row; the time
text is made once per millisecond and is still the right time. Real
outbox files, a real SQLite trace of the statements run.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from outbox_analytics import Client, utils

from .conftest import start_python

PLAIN_EVENT = {
    "order_id": "50314b8e9bcf000000000000",
    "total": 27.5,
    "currency": "USD",
    "count": 3,
    "gift": False,
    "coupon": None,
    "city": "Zürich",  # text that is not ASCII, but valid
    "products": [{"sku": "45790-32", "price": 19.0, "tags": ["a", 1, 2.5, None, True]}],
}


def python_functions_called(work: Any) -> set[str]:
    """The names of the Python functions that `work()` calls (profiled, not timed)."""
    called: set[str] = set()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            called.add(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
    return called


def test_a_plain_event_is_copied_without_the_warnings_bookkeeping() -> None:
    message = {"type": "track", "properties": PLAIN_EVENT, "context": {"ip": "203.0.113.7"}}
    called = python_functions_called(lambda: utils.clean(message))
    assert "_clean" not in called and "_clean_mapping" not in called, called
    assert utils.clean(message) == message
    assert utils.clean(message)["properties"] is not PLAIN_EVENT  # a copy, as before


@pytest.mark.parametrize(
    "unusual",
    [
        math.nan,
        math.inf,
        2**70,
        -(2**64),
        "lone \udc80 surrogate",
        b"bytes",
        (1, 2),
        {1: "number key"},
        {"k\udc80": "bad key"},
        datetime(2024, 1, 2, 3, 4, 5),
        {"set": {1}},
        [[[[]]]],
        True,
    ],
    ids=repr,
)
def test_what_is_not_plain_is_cleaned_as_before(unusual: Any) -> None:
    """The quick copy gives way to the full cleaning, whose result (and warning) it was."""
    message = {"properties": {"ok": "yes", "deep": {"list": [1, unusual]}}, "value": unusual}
    full = utils._clean(message, 0, None, None)
    assert repr(utils.clean(message)) == repr(full)  # (repr: NaN is never == NaN)


def test_nesting_past_the_limit_is_cut_where_it_passes_it() -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(150):
        inner["next"] = inner = {}
    message = {"properties": deep}
    assert utils.clean(message) == utils._clean(message, 0, None, None)
    assert utils.clean(message) != message  # cut
    cycle: dict[str, Any] = {"name": "loop"}
    cycle["self"] = cycle
    assert utils.clean({"properties": cycle})["properties"]["name"] == "loop"


def test_a_batch_is_inserted_a_few_statements_at_a_time(tmp_path: Path) -> None:
    client = Client("key", outbox_path=str(tmp_path / "o.db"), upload=False)
    try:
        assert client.outbox is not None
        client.track("u", "Before")  # (the connection is open now)
        statements: list[str] = []
        connection = client.outbox.database._connection()
        connection.set_trace_callback(statements.append)
        sent = []
        with client.batch():
            for n in range(1234):  # chunks of 250 and a rest
                sent.append(client.track("u", "In batch", {"n": n})[1]["messageId"])
        connection.set_trace_callback(None)
        inserts = [sql for sql in statements if sql.lstrip().upper().startswith("INSERT")]
        assert len(inserts) <= 4 + 234, len(inserts)  # one per row before: 1234
        rows = list(client.outbox.rows())
        assert [row.message["messageId"] for row in rows[1:]] == sent  # all, in order
        ids = [row.id for row in rows[1:]]
        assert ids == list(range(ids[0], ids[0] + 1234))  # consecutive, as one transaction's
    finally:
        client.shutdown()


def test_a_failed_batch_stores_none_of_its_chunks(tmp_path: Path) -> None:
    client = Client("key", outbox_path=str(tmp_path / "o.db"), upload=False)
    try:
        with pytest.raises(RuntimeError), client.batch():
            for n in range(600):
                client.track("u", "In batch", {"n": n})
            raise RuntimeError("the block fails")
        assert client.stats().pending == 0
    finally:
        client.shutdown()


def test_the_time_text_is_the_current_millisecond() -> None:
    """Never a millisecond early (before: 1 call in 10,000, (now - second) * 1000 rounded down)."""
    for _ in range(30_000):
        before = math.floor(time.time() * 1000)
        text = utils.utc_now_iso()
        after = math.floor(time.time() * 1000)
        assert len(text) == len("2024-01-02T03:04:05.678+00:00") and text.endswith("+00:00")
        stamped = round(datetime.fromisoformat(text).timestamp() * 1000)
        assert before <= stamped <= after


BLOCK_ENDED_IN_A_CHILD = """
import ctypes, json, os, sys
from outbox_analytics import Client

client = Client("key", outbox_path=sys.argv[1], upload=False)
client.track("u", "Before")
database = client.outbox.database
inherited = database._conn
with client.batch():
    client.track("u", "In the block")
    # A C-level fork (uWSGI's) runs none of Python's fork hooks; the child
    # goes on with the block, and commits it as it leaves.
    pid = ctypes.CDLL(None).fork()
if pid == 0:
    os._exit(0 if database._conn is not inherited else 1)
print(json.dumps(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])), flush=True)
"""


def test_a_block_that_a_child_ends_is_committed_on_the_childs_own_connection(
    tmp_path: Path,
) -> None:
    """Appends in a block no longer look at the process each; the block's commit does."""
    process = start_python(BLOCK_ENDED_IN_A_CHILD, str(tmp_path / "o.db"))
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert out.strip() == "0", "the child committed on its parent's connection"


RECOUNT_IN_A_CHILDS_BLOCK = """
import ctypes, os, signal, sys, threading
from outbox_analytics import Client

path = sys.argv[1]
client = Client("key", outbox_path=path, upload=False)
client.track("u", "Before")
outbox = client.outbox
held, release = threading.Event(), threading.Event()

def hold_the_files_lock():  # as a parent's thread inside a call at fork() time
    with outbox.database._file.lock:
        held.set()
        release.wait(30)

threading.Thread(target=hold_the_files_lock, daemon=True).start()
held.wait(10)
with outbox.batch():
    outbox.append(b"\\x80")
    pid = ctypes.CDLL(None).fork()  # C-level: no fork hook runs
    if pid == 0:
        signal.alarm(5)  # hung: SIGALRM ends the child
        os.rename(path, path + ".moved")  # the next recount follows the path
        outbox._counted_at = -1e9  # and the recount is due now
        outbox.append(b"\\x80")  # (a track() would look at the process for its id first)
    else:
        release.set()
if pid == 0:
    os._exit(0)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def test_a_recount_in_a_childs_block_never_waits_for_a_parents_lock(tmp_path: Path) -> None:
    """A C-level fork's child, in a block, whose recount follows a moved file: it goes on."""
    process = start_python(RECOUNT_IN_A_CHILDS_BLOCK, str(tmp_path / "o.db"))
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert out.strip() == "0", "the child hung on its parent's lock (-14: SIGALRM)"
