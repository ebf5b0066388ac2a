"""A client's options: each written once here, with its default and its check.

`Client(...)`'s signature is `ClientConfig`'s (see `client.takes_options`),
the module-level settings (`outbox_analytics.write_key`...) are its
defaults, and the module's default client is built from them by name. A
bad option fails here, at the caller's line, before any file is opened or
thread started.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import re
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import tenacity

from .delivery import DEFAULT_RETRY_WAIT
from .store import DEFAULT_MAX_PENDING
from .transport import Transport
from .utils import require

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

__all__ = [
    "DEFAULT_HOST",
    "KILL_SWITCH_ENV",
    "ClientConfig",
    "check_host",
    "client_host",
    "kill_switch_on",
]

log = logging.getLogger("outbox_analytics")

DEFAULT_HOST = "https://api.segment.io"
KILL_SWITCH_ENV = "OUTBOX_ANALYTICS_DISABLED"
KILL_SWITCH_SETTER_ENV = "OUTBOX_ANALYTICS_DISABLED_BY_PYTEST"  # the pid of the plugin's process

_FLAGS = ("debug", "send", "gzip", "sync_mode", "fsync", "upload", "hand_off_at_exit")

ErrorHandler = Callable[[Exception, list[dict[str, Any]]], Any]
BeforeSend = Callable[[dict[str, Any]], dict[str, Any] | None]


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Every option of a Client, in segment-analytics-python 2.4.0's order, then ours.

    Segment's keep its defaults. Ours: `outbox_path` (default:
    `default_outbox_path()`), `fsync` (survive power loss, not only a
    crash), `upload` (False: store only, and let another process, a later
    run or the CLI send), `retry_wait` (a tenacity wait strategy),
    `before_send` (a hook that may change or drop each message),
    `transport` (how batches are posted; tests use `MemoryTransport`) and
    `hand_off_at_exit` (what exit leaves pending goes to a detached sender).

    Built, it holds the options as the client uses them: `host` and
    `oauth_auth_server` without credentials (`host` the default URL when
    not given), `on_error` None when falsy.
    """

    write_key: str | None = dataclasses.field(default=None, repr=False)
    host: str | None = None
    debug: bool = False
    max_queue_size: int = DEFAULT_MAX_PENDING
    send: bool = True
    on_error: ErrorHandler | None = None
    gzip: bool = False
    max_retries: int = 10
    sync_mode: bool = False
    timeout: float = 15
    proxies: dict[str, str] | None = dataclasses.field(
        default=None, repr=False
    )  # may hold passwords
    thread: int = 1  # accepted for compatibility: ordering means one uploader
    upload_size: int = 100
    upload_interval: float = 0.5
    log_handler: logging.Handler | None = None
    oauth_client_id: str | None = None
    oauth_client_key: str | bytes | None = dataclasses.field(default=None, repr=False)
    oauth_key_id: str | None = None
    oauth_auth_server: str = "https://oauth2.segment.io"
    oauth_scope: str = "tracking_api:write"
    max_total_backoff_duration: float = 43200
    max_rate_limit_duration: float = 1800
    outbox_path: str | os.PathLike[str] | None = None
    fsync: bool = False
    upload: bool = True
    retry_wait: Callable[[tenacity.RetryCallState], float] = DEFAULT_RETRY_WAIT
    before_send: BeforeSend | None = None
    transport: Transport | None = None
    hand_off_at_exit: bool = False

    def __post_init__(self) -> None:
        # The kill switch waives the key (nothing is sent), unless one is given.
        if not kill_switch_on() or self.write_key is not None:
            require("write_key", self.write_key, str)
        self._check_numbers()
        for name in _FLAGS:  # send="false" would be true: a trap for settings read from text
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._set("on_error", self.on_error or None)  # Segment's own tests set on_error = False
        for name in ("on_error", "before_send", "retry_wait"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable, got {getattr(self, name)!r}")
        self._check_objects()
        if self.host:  # "" means the default, as in Segment
            require("host", self.host, str)
            check_host(self.host)
        self._set("host", client_host(self.host))
        require("oauth_scope", self.oauth_scope, str)
        require("oauth_auth_server", self.oauth_auth_server, str)
        check_host(self.oauth_auth_server, "oauth_auth_server")
        auth_server = _without_credentials("oauth_auth_server", self.oauth_auth_server)
        self._set("oauth_auth_server", auth_server)

    def _check_numbers(self) -> None:
        for name in ("max_queue_size", "max_retries", "upload_size", "thread"):
            _require_number(name, getattr(self, name), minimum=0 if name == "max_retries" else 1)
        for name in ("timeout", "upload_interval"):
            _require_number(name, getattr(self, name), minimum=0, integral=False)
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        for name in ("max_total_backoff_duration", "max_rate_limit_duration"):  # inf: no limit
            _require_number(name, getattr(self, name), minimum=0, integral=False)
        if self.timeout == 0:  # requests refuses it at every request: say so here, once
            raise ValueError("timeout must be a number > 0 (seconds), got 0")

    def _check_objects(self) -> None:
        """The options that are objects: their types, shown without their values (secrets)."""
        proxies = self.proxies
        if proxies is not None and not (
            isinstance(proxies, dict) and all(isinstance(v, str) for v in proxies.values())
        ):  # a proxy URL may hold a password: never quoted
            raise AssertionError(
                "proxies must be a dict of URL strings, as requests takes it,"
                f" got a value of type {type(proxies).__name__}"
            )
        if self.outbox_path is not None:
            require("outbox_path", self.outbox_path, (str, os.PathLike))
        if self.transport is not None and not callable(getattr(self.transport, "post", None)):
            raise TypeError(f"transport must have a post() method, got {self.transport!r}")
        if self.log_handler is not None and not isinstance(self.log_handler, logging.Handler):
            raise TypeError(f"log_handler must be a logging.Handler, got {self.log_handler!r}")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen: only while being built

    @property
    def oauth_key(self) -> RSAPrivateKey | None:
        """The loaded OAuth private key, or None when OAuth is off; ValueError if it is bad."""
        return _oauth_key(self.oauth_client_id, self.oauth_client_key, self.oauth_key_id)


def option_names() -> list[str]:
    """The names of a Client's options, in the order of its signature."""
    return [field.name for field in dataclasses.fields(ClientConfig)]


def client_host(host: str | None) -> str:
    """The host as the client uses, stores and shows it: the default for None, no credentials."""
    return _without_credentials("host", host or DEFAULT_HOST).rstrip("/")


def check_host(host: str, name: str = "host") -> None:
    """A URL that can never work fails here (before it is recorded as the outbox's owner).

    The message never quotes credentials the URL carries (user:password@).
    """
    shown = _CREDENTIALS.sub("//<credentials>@", host)
    try:
        parts = urllib.parse.urlsplit(host)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"{name} is not a valid URL ({exc}): {shown!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} must be an http(s) URL such as {DEFAULT_HOST}, got {shown!r}")


_CREDENTIALS = re.compile(r"//[^/?#]*@")


def _without_credentials(name: str, url: str) -> str:
    """`url` without a user:password@ part, which is never sent, stored or shown (Segment's way).

    requests would send it as Basic auth in place of the write key, and it
    would be quoted in every error, log line and the outbox file.
    """
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parts is None or "@" not in parts.netloc:
        return url
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    if bare not in _credentials_warned:  # once per process: the CLI and its client both ask
        _credentials_warned.add(bare)
        log.warning(
            "%s carries credentials (user:password@): they are ignored, never sent or shown;"
            " the write key (or OAuth) authenticates",
            name,
        )
    return bare


_credentials_warned: set[str] = set()


def kill_switch_on() -> bool:
    """Whether $OUTBOX_ANALYTICS_DISABLED turns every client into send=False.

    Not where the pytest plugin set it for the processes its tests start
    (it names its own process): there, its capture decides.
    """
    if os.environ.get(KILL_SWITCH_SETTER_ENV) == str(os.getpid()):
        return False
    return os.environ.get(KILL_SWITCH_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _oauth_key(client_id: Any, client_key: Any, key_id: Any) -> RSAPrivateKey | None:
    given = {
        "oauth_client_id": client_id,
        "oauth_client_key": client_key,
        "oauth_key_id": key_id,
    }
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise ValueError(f"OAuth needs all three of {sorted(given)}; missing: {missing}")
    require("oauth_client_id", client_id, str)
    require("oauth_key_id", key_id, str)
    require("oauth_client_key", client_key, (str, bytes))
    # Imported only now: PyJWT and cryptography take over 100 ms to import,
    # a cost every process would pay on `import outbox_analytics` otherwise.
    from .oauth import load_private_key

    return load_private_key(client_key)


def _at_least(value: Any, minimum: float) -> bool:
    return bool(value >= minimum)  # False for NaN, as for anything below


def _require_number(name: str, value: Any, minimum: float, integral: bool = True) -> None:
    kind = int if integral else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not _at_least(value, minimum):
        wanted = "an integer" if integral else "a number"
        raise ValueError(f"{name} must be {wanted} >= {minimum}, got {value!r}")
