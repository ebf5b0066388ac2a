"""Secrets stay home: no key, token, assertion or password in any text we give out.

"Any text" includes what error trackers make of an exception: Sentry, rich and
better_exceptions record the local variables of every frame of its traceback
and of the exceptions chained to it. `formatted()` does the same.
"""

from __future__ import annotations

import base64
import json
import traceback
from pathlib import Path

import pytest

from outbox_analytics import Client, DeliveryError, cli

from .receiver import Reply
from .test_oauth import CLIENT_ID, KEY_ID, AuthServer

WRITE_KEY = "test-write-key"
BASIC = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()


def formatted(exc: BaseException) -> str:
    """The exception as an error tracker records it: every frame, with its locals."""
    return "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())


def stored(outbox_file: Path) -> bytes:
    return b"".join(
        path.read_bytes()
        for path in outbox_file.parent.iterdir()
        if path.name.startswith(outbox_file.name)
    )


@pytest.mark.parametrize("status", [500, 400])
def test_on_error_and_sync_errors_carry_no_frame_holding_the_write_key(
    make_client, receiver, status: int
) -> None:
    receiver.responder = lambda request: Reply(status, body='{"message": "no"}')
    reports: list[Exception] = []
    client = make_client(max_retries=1, on_error=lambda exc, batch: reports.append(exc))
    client.track("user", "E")
    client.flush(timeout=10)
    synced = make_client(sync_mode=True, max_retries=0)
    with pytest.raises(DeliveryError) as raised:
        synced.track("user", "F")
    assert reports
    for exc in [*reports, raised.value]:
        text = formatted(exc)
        assert WRITE_KEY not in text and BASIC not in text


def _oauth_client(make_client, auth: AuthServer, key_pem: str) -> tuple[Client, list[Exception]]:
    """An OAuth client of `auth`, with no retries, and the errors it hands on_error."""
    reports: list[Exception] = []
    client = make_client(
        max_retries=0, on_error=lambda exc, batch: reports.append(exc),
        oauth_client_id=CLIENT_ID, oauth_client_key=key_pem, oauth_key_id=KEY_ID,
        oauth_auth_server=auth.url,
    )  # fmt: skip
    return client, reports


def test_oauth_failures_carry_no_token_or_assertion(
    make_client, receiver, key_pem: str, outbox_file: Path
) -> None:
    auth = AuthServer(receiver, key_pem)
    auth.token_script = [Reply(503)]  # the first token request fails: from the token's frames
    failures = iter([Reply(500), Reply(500)])  # then batches fail: from the request's frames

    def respond(request):
        if request.path == "/token":
            return auth.token(request)
        checked = auth.batch(request)
        return checked if checked.status != 200 else next(failures, checked)

    receiver.responder = respond
    client, reports = _oauth_client(make_client, auth, key_pem)
    client.track("user", "E")
    for _ in range(4):
        client.flush(timeout=5)
    assert len(reports) >= 2 and auth.issued
    secrets = [*auth.issued, *(form["client_assertion"] for form in auth.forms), WRITE_KEY]
    for exc in reports:
        text = formatted(exc)
        assert not [secret for secret in secrets if secret in text]


def test_a_password_in_the_host_is_never_sent_stored_or_shown(
    receiver, outbox_file: Path, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    password = "S3cretPassw0rd"
    receiver.responder = lambda request: Reply(302, {"Location": receiver.url + "/elsewhere"})
    reports: list[Exception] = []
    client = Client(
        WRITE_KEY, host=receiver.url.replace("://", f"://admin:{password}@"), max_retries=0,
        outbox_path=str(outbox_file), on_error=lambda exc, batch: reports.append(exc),
    )  # fmt: skip
    client.track("user", "E")
    client.flush(timeout=5)
    stats = client.stats()
    client.shutdown(timeout=1)
    assert receiver.requests and reports and stats is not None and stats.head_last_error
    assert receiver.requests[0].headers["Authorization"] == f"Basic {BASIC}"  # the key's
    cli.main(["status", "--json", str(outbox_file)])
    shown = [
        capsys.readouterr().out,
        stats.head_last_error,
        *(formatted(exc) for exc in reports),
        *(record.getMessage() for record in caplog.records),
        client.host,
    ]
    assert "ignored" in "\n".join(shown)  # said once, at Client()
    assert not [text for text in shown if password in text or "admin" in text]
    assert password.encode() not in stored(outbox_file)
    assert json.loads(shown[0])["pending"] == 1


def test_a_token_server_quoting_the_assertion_puts_it_nowhere(
    make_client, receiver, key_pem: str, outbox_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="outbox_analytics")
    auth = AuthServer(receiver, key_pem)
    refused: list[str] = []

    def quote_it(request):
        if request.path != "/token":
            return auth.batch(request)
        refused.append(request.form["client_assertion"])
        error = {"error": "invalid_client", "error_description": f"{refused[-1]} refused"}
        return Reply(400, body=json.dumps(error))

    receiver.responder = quote_it
    client, reports = _oauth_client(make_client, auth, key_pem)
    client.track("user", "E")
    client.flush(timeout=5)
    stats = client.stats()
    assert refused and reports and stats is not None
    texts = [stats.head_last_error or "", *(r.getMessage() for r in caplog.records)]
    texts += [str(exc) for exc in reports]
    assert "<redacted> refused" in texts[0]
    for assertion in refused:
        assert not [text for text in texts if assertion[:40] in text]
        assert assertion[:40].encode() not in stored(outbox_file)


def test_an_answer_quoting_the_key_or_its_header_puts_them_nowhere(
    make_client, receiver, outbox_file: Path, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    quoted = f'{{"error": "bad credentials: Basic {BASIC} ({WRITE_KEY}:)"}}'
    receiver.responder = lambda request: Reply(401, body=quoted)
    client = make_client(max_retries=0)
    client.track("user", "E")
    client.flush(timeout=5)
    stats = client.stats()
    client.shutdown(timeout=1)
    cli.main(["list", str(outbox_file)])
    texts = [stats.head_last_error or "", capsys.readouterr().out]
    texts += [r.getMessage() for r in caplog.records]
    assert "bad credentials: Basic <redacted>" in texts[0]
    assert not [text for text in texts if WRITE_KEY in text or BASIC in text]
    assert WRITE_KEY.encode() not in stored(outbox_file)


def test_a_proxy_quoting_its_credentials_puts_them_nowhere(
    outbox_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from .test_network_lies import RawServer

    def proxy_refuses(conn) -> None:  # quotes what it was sent, as some proxies' pages do
        body = f"denied: {proxy.last_request!r}".encode()
        conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
        conn.sendall(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    proxy = RawServer(proxy_refuses)
    try:
        client = Client(
            WRITE_KEY, host="http://api.invalid", outbox_path=str(outbox_file), max_retries=0,
            proxies={"http": proxy.url.replace("://", "://proxyuser:Pr0xyPassw0rd@")},
        )  # fmt: skip
        client.track("user", "E")
        client.flush(timeout=5)
        stats = client.stats()
        client.shutdown(timeout=1)
    finally:
        proxy.close()
    assert stats is not None and b"Proxy-Authorization" in proxy.last_request
    proxy_basic = base64.b64encode(b"proxyuser:Pr0xyPassw0rd").decode()
    texts = [stats.head_last_error or "", *(r.getMessage() for r in caplog.records)]
    assert "407" in texts[0] and "<redacted>" in texts[0]
    for secret in (proxy_basic, "Pr0xyPassw0rd", BASIC):
        assert not [text for text in texts if secret in text]


@pytest.mark.parametrize("unescaped", ["#", "/", "?"])
def test_a_proxy_password_with_an_unescaped_character_appears_nowhere(
    outbox_file: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    unescaped: str,
) -> None:
    # Not a valid URL: the parser stops at the character and quotes what came before.
    monkeypatch.setenv("HTTP_PROXY", f"http://proxyuser:Correct{unescaped}Horse9@127.0.0.1:1")
    client = Client(WRITE_KEY, host="http://127.0.0.1:9", outbox_path=str(outbox_file))
    client.track("user", "E")
    result = client.flush(timeout=5)
    stats = client.stats()
    client.shutdown(timeout=1)
    texts = [result.last_error or "", stats.head_last_error or ""]
    texts += [r.getMessage() for r in caplog.records]
    assert "percent-encoded" in texts[0] and result.pending == 1
    for secret in ("Correct", "Horse9"):
        assert not [text for text in texts if secret in text], secret
        assert secret.encode() not in stored(outbox_file)


def test_drain_force_with_credentials_in_host_records_the_bare_host(
    outbox_file: Path, receiver
) -> None:
    Client(WRITE_KEY, host="http://127.0.0.1:1", outbox_path=str(outbox_file), upload=False)
    with_credentials = receiver.url.replace("://", "://u:p@")
    args = ["drain", "--write-key", WRITE_KEY, "--host", with_credentials, "--force"]
    assert cli.main([*args, "--timeout", "5", str(outbox_file)]) == 0
    client = Client(WRITE_KEY, host=receiver.url, outbox_path=str(outbox_file))  # no mismatch
    client.shutdown(timeout=1)
