"""The clients of this process that send from the same outbox file, found by the file itself.

Two clients may name one file by different paths (a symlink, a relative
path): what makes them peers is the file's identity (device and inode). A
sync_mode call hurries its peers and watches them fail; all of them share
what the endpoint answered lately (see triage.py).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from ..store import Outbox
from .triage import Rejections

if TYPE_CHECKING:
    from .uploader import Uploader

__all__ = ["peers_of", "rejections_of"]

Identity = tuple[int, int]

_uploaders: weakref.WeakSet[Uploader] = weakref.WeakSet()
_rejections: dict[Identity, Rejections] = {}


def _identity(outbox: Outbox) -> Identity:
    return outbox.database.identity


def join(uploader: Uploader) -> None:
    _uploaders.add(uploader)


def peers_of(uploader: Uploader) -> list[Uploader]:
    """The other uploaders of this process on the same file."""
    mine = _identity(uploader.outbox)
    return [
        other
        for other in list(_uploaders)
        if other is not uploader and _identity(other.outbox) == mine
    ]


def rejections_of(outbox: Outbox) -> Rejections:
    """What the endpoint answered lately for this file, shared by its clients here."""
    return _rejections.setdefault(_identity(outbox), Rejections())
