"""OAuth for Segment's tracking API: JWT client assertions, cached and refreshed tokens.

The token manager is called by the requester on the uploader's thread, so
every failure here is a `RetryableError` that the uploader's retry policy
handles like any other: rows stay pending, waits are interruptible, flush and
shutdown deadlines hold. Nothing secret (the private key, an assertion, a
token) is ever put in a log line or an exception message.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from email.utils import parsedate_to_datetime

import jwt
import requests
import urllib3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .errors import RetryableError
from .request import Redactor, capped_wait, error_fields, parse_retry_after
from .utils import RateLimitedLog, printable
from .wire import read_answer

__all__ = ["AuthError", "TokenManager", "load_private_key"]

log = logging.getLogger("outbox_analytics")

ASSERTION_LIFETIME = 60  # seconds: a client assertion is used once, at once
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# A token is renewed once this share of its lifetime has passed, so that a
# batch never goes out with a token about to expire in flight.
_REFRESH_AT = 0.8
# Answers meaning "your clock and mine disagree": retry at once with the skew
# learnt from the answer's Date header.
_CLOCK_ERRORS = ("Token is expired", "Token used before issued")
# What a header value can carry: visible ASCII, no space (RFC 6750's
# b64token is narrower; real servers' tokens stay within this).
_TOKEN_CHARACTERS = re.compile(r"[\x21-\x7e]+")


class AuthError(RetryableError):
    """The token server refused our credentials: a configuration error.

    Retryable all the same: the events stay pending until the settings (or
    the server) are fixed, and are never dead-lettered for it.
    """


def load_private_key(pem: str | bytes) -> rsa.RSAPrivateKey:
    """Load `oauth_client_key`; raise ValueError (without the key's text) if it is not RSA."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"oauth_client_key is not an unencrypted PEM private key ({type(exc).__name__})"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(
            f"oauth_client_key must be an RSA private key (RS256), not {type(key).__name__}"
        )
    return key


class TokenManager:
    """Obtains, caches, refreshes and invalidates one access token, thread-safely."""

    def __init__(
        self,
        client_id: str,
        private_key: rsa.RSAPrivateKey,
        key_id: str,
        auth_server: str,
        scope: str,
        *,
        session: requests.Session,
        timeout: float,
        proxies: dict[str, str] | None = None,
        verify: bool | str = True,
        redactor: Redactor | None = None,
    ) -> None:
        self.client_id = client_id
        self.key_id = key_id
        self.audience = auth_server.rstrip("/")
        self.url = self.audience + "/token"
        self.scope = scope
        self.session = session
        self.timeout = timeout
        self.proxies = proxies
        self.verify = verify
        self._private_key = private_key
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = 0.0  # monotonic
        self.clock_offset = 0.0  # the token server's clock minus ours, seconds
        self.fetches = 0  # token requests made (for stats and tests)
        self._error_log = RateLimitedLog()
        # Tokens and assertions, left out of what a server says (it may quote them).
        self.redactor = redactor or Redactor()

    def authorization(self) -> str:
        """The Authorization header value; fetches a token when none is fresh."""
        with self._lock:
            if self._token is None or time.monotonic() >= self._renew_at:
                self._token = None
                self._fetch()
            assert self._token is not None
            return f"Bearer {self._token}"

    def invalidate(self) -> None:
        """Forget the token (the API answered 401/403): the next request fetches another."""
        with self._lock:
            self._token = None

    # -- fetching -----------------------------------------------------------------

    def _assertion(self) -> str:
        now = int(time.time() + self.clock_offset)
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.audience,
            "iat": now - 5,  # a little in the past: clocks are never quite equal
            "exp": now + ASSERTION_LIFETIME,
            "jti": str(uuid.uuid4()),
        }
        assertion = jwt.encode(
            claims, self._private_key, algorithm="RS256", headers={"kid": self.key_id}
        )
        self.redactor.add_recent(assertion)
        return assertion

    def _fetch(self) -> None:
        self.fetches += 1
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": _ASSERTION_TYPE,
            "client_assertion": self._assertion(),
            "scope": self.scope,
        }
        try:
            response = self.session.post(
                self.url,
                data=form,  # requests form-encodes (and escapes) it
                timeout=self.timeout,
                proxies=self.proxies,
                verify=self.verify,
                # Never: a redirect would post the signed client assertion to
                # another host, and that host's token would carry our batches.
                allow_redirects=False,
                stream=True,  # read within bounds
            )
            text, problem = read_answer(response)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise RetryableError(f"OAuth token request failed: {type(exc).__name__}") from None
        self._learn_clock(response.headers.get("Date"))
        if response.status_code == 200 and problem is None:
            self._accept(text)
            return
        raise self._error_for(response, text)

    def _accept(self, text: str) -> None:
        try:
            payload = json.loads(text)
            token = payload["access_token"]
            lifetime = float(payload.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise RetryableError(
                "OAuth token response has no usable access_token", status=200
            ) from None
        if not isinstance(token, str) or not _TOKEN_CHARACTERS.fullmatch(token):
            # Empty, or what no header may carry (a newline, a space): requests
            # would refuse every batch, quoting the token in its error.
            raise RetryableError("OAuth token response has no usable access_token", status=200)
        self.redactor.add_recent(token)
        self._token = token
        self._renew_at = time.monotonic() + max(1.0, lifetime) * _REFRESH_AT
        log.debug("OAuth token obtained, valid for %.0fs", lifetime)

    def _learn_clock(self, date_header: str | None) -> None:
        if not date_header:
            return
        try:
            self.clock_offset = parsedate_to_datetime(date_header).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            log.debug("OAuth token server sent an unreadable Date header")

    def _error_for(self, response: requests.Response, text: str) -> RetryableError:
        status = response.status_code
        code, description = error_fields(self.redactor(text), "error", "error_description")
        description = description or self.redactor(response.reason or "")
        if status == 429:
            wait = _rate_limit_reset(response.headers.get("X-RateLimit-Reset"), time.time())
            if wait is None:
                wait = parse_retry_after(response.headers.get("Retry-After"), time.time())
            return RetryableError("OAuth token server rate limit", status=429, retry_after=wait)
        if 300 <= status < 400:
            return RetryableError(
                f"OAuth token server answered {status}: redirects are never followed;"
                " set oauth_auth_server to the token server's own address",
                status=status,
            )
        if status in (400, 401, 403, 415):
            if description in _CLOCK_ERRORS:
                # The Date header just corrected our clock: try again at once.
                return RetryableError(f"OAuth clock skew: {description}", status=status)
            error = AuthError(
                f"OAuth token request rejected ({status} {code}: {description});"
                " check oauth_client_id, oauth_key_id, oauth_client_key and oauth_scope",
                status=status,
                body=f"{code}: {description}",
            )
            suppressed = self._error_log.ready()
            if suppressed is not None:
                log.error("%s (%d more since the last report)", printable(str(error)), suppressed)
            return error
        return RetryableError(f"OAuth token server answered {status}", status=status)


def _rate_limit_reset(value: str | None, now: float) -> float | None:
    """X-RateLimit-Reset: seconds to wait, or a unix time (seconds or milliseconds)."""
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    if number is None:
        return None
    if number > 1e12:  # unix time in milliseconds
        number = number / 1000 - now
    elif number > 1e9:  # unix time in seconds
        number -= now
    return capped_wait(number)
