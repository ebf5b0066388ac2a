"""OAuth against a real token server on 127.0.0.1 that verifies every client assertion."""

from __future__ import annotations

import base64
import json
import secrets
import time
from email.utils import formatdate
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from outbox_analytics import Client
from outbox_analytics.oauth import AuthError

from .receiver import Received, Receiver, Reply

CLIENT_ID = "client-123"
KEY_ID = "key-7"


class AuthServer:
    """Token endpoint and batch endpoint on one receiver; checks what a real one checks."""

    def __init__(self, receiver: Receiver, key_pem: str) -> None:
        self.receiver = receiver
        self.public_key = serialization.load_pem_private_key(key_pem.encode(), None).public_key()
        self.url = receiver.url  # the auth server and the API share one address
        self.issued: list[str] = []
        self.revoked: set[str] = set()
        self.expires_in = 3600
        self.token_lifetime: dict[str, float] = {}
        self.clock_offset = 0.0  # this server's clock minus the real one
        self.token_script: list[Reply] = []  # answers to give before issuing tokens
        self.rejected_assertions: list[str] = []
        self.forms: list[dict[str, str]] = []
        self.batches_by_token: list[str] = []
        receiver.responder = self.respond

    def now(self) -> float:
        return time.time() + self.clock_offset

    def respond(self, request: Received) -> Reply:
        if request.path == "/token":
            return self.token(request)
        return self.batch(request)

    def token(self, request: Received) -> Reply:
        date = {"Date": formatdate(self.now(), usegmt=True)}
        form = request.form
        self.forms.append(form)
        if self.token_script:
            reply = self.token_script.pop(0)
            reply.headers = {**date, **reply.headers}
            return reply
        problem = self.check_assertion(form)
        if problem:
            self.rejected_assertions.append(problem)
            body = f'{{"error": "invalid_request", "error_description": "{problem}"}}'
            return Reply(400, headers=date, body=body)
        token = secrets.token_urlsafe(24)
        self.issued.append(token)
        self.token_lifetime[token] = time.monotonic() + self.expires_in
        body = f'{{"access_token": "{token}", "expires_in": {self.expires_in}}}'
        return Reply(200, headers=date, body=body)

    def check_assertion(self, form: dict[str, str]) -> str | None:
        if form.get("grant_type") != "client_credentials":
            return "bad grant_type"
        if form.get("client_assertion_type") != (
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        ):
            return "bad client_assertion_type"
        assertion = form.get("client_assertion", "")
        if jwt.get_unverified_header(assertion).get("kid") != KEY_ID:
            return "bad kid"
        try:
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=["RS256"],
                audience=self.url,
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.InvalidTokenError as exc:
            return f"bad assertion: {type(exc).__name__}"
        if claims["iss"] != CLIENT_ID or claims["sub"] != CLIENT_ID or not claims.get("jti"):
            return "bad iss/sub/jti"
        now = self.now()
        if claims["iat"] > now + 10:
            return "Token used before issued"
        if claims["exp"] < now:
            return "Token is expired"
        if claims["exp"] - claims["iat"] > 300:
            return "assertion lives too long"
        return None

    def batch(self, request: Received) -> Reply:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ")
        valid = (
            header.startswith("Bearer ")
            and token in self.token_lifetime
            and token not in self.revoked
            and time.monotonic() < self.token_lifetime[token]
        )
        if not valid:
            return Reply(401, body='{"code": "unauthorized", "message": "bad token"}')
        self.batches_by_token.append(token)
        return Reply()


@pytest.fixture
def auth(receiver, key_pem) -> AuthServer:
    return AuthServer(receiver, key_pem)


@pytest.fixture
def oauth_client(make_client, auth, key_pem):
    def make(**options) -> Client:
        return make_client(
            oauth_client_id=CLIENT_ID,
            oauth_client_key=key_pem,
            oauth_key_id=KEY_ID,
            oauth_auth_server=auth.url + "/",
            **options,
        )

    return make


def track(client: Client, count: int) -> list[dict]:
    return [client.track("user", "Numbered", {"n": n})[1] for n in range(count)]


def test_events_are_delivered_with_a_bearer_token(oauth_client, auth, receiver) -> None:
    client = oauth_client()
    sent = track(client, 3)
    assert client.flush(timeout=10).sent == 3
    assert receiver.accepted() == sent
    (token,) = auth.issued
    batch_request = next(r for r in receiver.requests if r.path == "/v1/batch")
    assert batch_request.headers["Authorization"] == f"Bearer {token}"
    assert auth.rejected_assertions == []
    assert auth.forms[0]["scope"] == "tracking_api:write"


def test_one_token_serves_many_batches(oauth_client, auth) -> None:
    client = oauth_client(upload_size=5)
    with client.batch():
        track(client, 50)
    assert client.flush(timeout=10).sent == 50
    assert len(auth.issued) == 1
    assert len(auth.batches_by_token) == 10


def test_tokens_are_refreshed_before_they_expire(oauth_client, auth) -> None:
    auth.expires_in = 2
    client = oauth_client()
    track(client, 1)
    client.flush(timeout=10)
    time.sleep(1.7)  # past 80% of the lifetime, not past the end
    track(client, 1)
    client.flush(timeout=10)
    assert len(auth.issued) == 2
    assert auth.batches_by_token == auth.issued  # each batch with a fresh token, none refused
    batch_requests = [r for r in auth.receiver.requests if r.path == "/v1/batch"]
    assert len(batch_requests) == 2  # no batch was refused for an expired token


def test_a_401_on_a_batch_fetches_a_new_token(oauth_client, auth, receiver) -> None:
    client = oauth_client()
    track(client, 1)
    client.flush(timeout=10)
    auth.revoked.add(auth.issued[0])
    sent = track(client, 2)
    assert client.flush(timeout=10).sent == 2
    assert len(auth.issued) == 2
    assert receiver.accepted()[-2:] == sent


@pytest.mark.parametrize(
    "failure",
    [
        Reply(429, headers={"X-RateLimit-Reset": "1"}),
        Reply(503),
        Reply(500),
        Reply(drop=True),
    ],
)
def test_token_endpoint_failures_then_recovery_lose_nothing(
    oauth_client, auth, receiver, failure
) -> None:
    auth.token_script = [failure, failure]
    client = oauth_client(max_retries=5)
    sent = track(client, 4)
    started = time.monotonic()
    assert client.flush(timeout=20).sent == 4
    assert receiver.accepted() == sent
    if failure.status == 429:
        assert time.monotonic() - started >= 1.9  # waited for the reset, twice


def test_a_token_server_down_for_a_while_loses_nothing(oauth_client, auth, receiver) -> None:
    down_until = time.monotonic() + 1.5
    respond = auth.respond
    auth.receiver.responder = lambda r: (
        Reply(503) if r.path == "/token" and time.monotonic() < down_until else respond(r)
    )
    client = oauth_client(max_retries=2)
    sent = track(client, 5)
    deadline = time.monotonic() + 20
    while client.flush(timeout=5).pending and time.monotonic() < deadline:
        time.sleep(0.1)
    assert receiver.accepted() == sent
    assert client.stats().dead == 0


def test_rejected_credentials_keep_events_pending_and_say_so(
    oauth_client, auth, caplog: pytest.LogCaptureFixture
) -> None:
    auth.token_script = [
        Reply(401, body='{"error": "invalid_client", "error_description": "unknown key"}')
    ] * 20
    errors = []
    client = oauth_client(max_retries=1, on_error=lambda exc, batch: errors.append(exc))
    track(client, 2)
    result = client.flush(timeout=10)
    assert (result.sent, result.dead, result.pending) == (0, 0, 2)
    stats = client.stats()
    assert stats.pending == 2 and stats.dead == 0
    assert "invalid_client" in stats.head_last_error
    assert isinstance(errors[0], AuthError)
    assert any("check oauth_client_id" in r.getMessage() for r in caplog.records)


def test_the_clock_of_the_token_server_wins(oauth_client, auth, receiver) -> None:
    auth.clock_offset = 3600.0  # the server is an hour ahead of us
    client = oauth_client()
    sent = track(client, 1)
    assert client.flush(timeout=10).sent == 1
    assert receiver.accepted() == sent
    assert auth.rejected_assertions == ["Token is expired"]  # once, then corrected


def test_the_form_is_properly_encoded(oauth_client, auth) -> None:
    client = oauth_client(oauth_scope="tracking_api:write other&scope=x")
    track(client, 1)
    assert client.flush(timeout=10).sent == 1
    assert auth.forms[0]["scope"] == "tracking_api:write other&scope=x"


def test_a_bad_key_fails_at_construction(tmp_path: Path, key_pem: str) -> None:
    common = {"oauth_client_id": CLIENT_ID, "oauth_key_id": KEY_ID, "send": False}
    with pytest.raises(ValueError, match="not an unencrypted PEM private key") as excinfo:
        Client("k", oauth_client_key="-----BEGIN PRIVATE KEY-----\nnot a key\n", **common)
    assert "not a key" not in str(excinfo.value)
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="must be an RSA private key"):
        Client("k", oauth_client_key=ec_key.decode(), **common)
    with pytest.raises(ValueError, match="missing"):
        Client("k", oauth_client_id=CLIENT_ID, oauth_client_key=key_pem, send=False)


def test_secrets_never_reach_logs_or_the_outbox(
    oauth_client, auth, receiver, key_pem, outbox_file, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="outbox_analytics")
    auth.token_script = [Reply(503)]
    client = oauth_client()
    track(client, 3)
    client.flush(timeout=10)
    auth.revoked.add(auth.issued[0])
    track(client, 1)
    client.flush(timeout=10)
    assert len(receiver.accepted()) == 4

    key_body = "".join(key_pem.strip().splitlines()[1:-1])
    assertions = [form["client_assertion"] for form in auth.forms]
    secrets_seen = [*auth.issued, *assertions, key_body[:40], key_body[-40:], "test-write-key"]
    secrets_seen.append(base64.b64encode(b"test-write-key:").decode())
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    stored = b"".join(
        outbox_file.with_name(outbox_file.name + suffix).read_bytes()
        for suffix in ("", "-wal")
        if outbox_file.with_name(outbox_file.name + suffix).exists()
    )
    for secret in secrets_seen:
        assert secret not in logged
        assert secret.encode() not in stored


def test_the_token_request_never_follows_a_redirect(oauth_client, auth, receiver) -> None:
    """A 307 would post the signed assertion to another host and use that host's token."""
    from .receiver import Receiver

    elsewhere = Receiver()
    try:
        auth.token_script = [
            Reply(307, headers={"Location": elsewhere.url + "/token"}, body="")
        ] * 20
        client = oauth_client(max_retries=1)
        client.track("user", "E")
        result = client.flush(timeout=10)
        assert result.pending == 1
        assert elsewhere.requests == []  # the assertion never left for the other host
        assert auth.batches_by_token == []
        stats = client.stats()
        assert stats is not None and "redirects are never followed" in (stats.head_last_error or "")
    finally:
        elsewhere.close()


def test_a_token_no_header_can_carry_is_refused_and_never_shown(
    oauth_client, auth, receiver
) -> None:
    """A token ending in a newline: requests' own error would quote it, "Bearer <token>"."""
    bad = "tok-" + secrets.token_urlsafe(8) + "\n"
    auth.token_script = [Reply(200, body=json.dumps({"access_token": bad, "expires_in": 3600}))]
    client = oauth_client(max_retries=2)
    client.track("user", "E")
    assert client.flush(timeout=10).sent == 1  # the next token was a good one
    assert len(auth.forms) == 2  # the bad one was never used
    stats = client.stats()
    assert stats is not None and bad.strip() not in (stats.head_last_error or "")


def test_a_refused_header_is_reported_without_its_value(receiver) -> None:
    """Whatever the token source hands over, requests' error quoting it never reaches our text."""
    from outbox_analytics import RetryableError
    from outbox_analytics.request import Requester

    class LeakyTokens:  # a TokenSource (request.py) whose token no header may carry
        def authorization(self) -> str:
            return "Bearer secret-token\n"

        def invalidate(self) -> None:
            pass

    requester = Requester("k", receiver.url, timeout=5, token_manager=LeakyTokens())
    try:
        with pytest.raises(RetryableError) as raised:
            requester.send(b'{"batch": []}')
    finally:
        requester.close()
    assert "secret-token" not in str(raised.value)
    assert "header was refused" in str(raised.value)
    assert receiver.requests == []
