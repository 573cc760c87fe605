"""Fuzzing the gateway as an attacker would: no 5xx, no traceback, no write for a refusal.

Hypothesis generates request bodies (JSON of any shape and depth, raw
bytes), paths (segments with any character, percent-encoded or not, dot
segments), headers (content types, credentials) and multipart parts, and
sends them to the proxied, credit, admin and webhook routes of one gateway
served over loopback (SQLite), with a fake upstream behind it. For every
case:

- the status is below 500;
- nothing was logged with a traceback;
- when the gateway refused the request (4xx), the ledger, the usage events,
  the holds and the webhook events have the rows they had before;
- the process's resident memory (gateway and client in one process) grows by
  less than 64 MB over all cases: the gateway keeps nothing of them.

`FUZZ_EXAMPLES` sets the cases per route group (default 120: 6 groups, 720
cases, about 45 s on a busy 2-core machine); the test prints the count it ran.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from gateway.app import create_app
from gateway.demo.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream
from gateway.settings import Secret, Settings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
SERVICE_TOKEN = "svc-fuzz-token"
WEBHOOK_SECRET = "whsec_fuzz_0123456789"
PRACTICE = "prac_fuzz"
COUNTED_TABLES = ("ai_credit_ledger", "ai_usage_events", "ai_budget_holds", "stripe_webhook_events")
MEMORY_BOUND_BYTES = 64 * 1024 * 1024

RAN: dict[str, int] = {}

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run: CI failures reproduce
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


class _Tracebacks(logging.Handler):
    """Collects every log record that carries a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.exc_text or "Traceback" in record.getMessage():
            self.records.append(record)


class _SturdyUpstream:
    """The fake upstream, answering 400 where its own parsing of a fuzzed body fails.

    The fake is a test double, not the subject: its failures must not look
    like the gateway's.
    """

    def __init__(self) -> None:
        self.fake = FakeUpstream()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watched(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.fake(scope, receive, watched)
        except Exception:
            if started:
                raise
            body = json.dumps(
                {"error": {"message": "bad", "type": "invalid_request_error", "code": None}}
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})


@dataclass
class Live:
    root: str
    key: str
    db_path: Path
    tracebacks: _Tracebacks

    def settled_counts(self) -> tuple[int, ...]:
        """The counts once the previous case's settle (a background task) is done: no hold left."""
        deadline = time.monotonic() + 10
        while True:
            counts = self.counts()
            if counts[COUNTED_TABLES.index("ai_budget_holds")] == 0:
                return counts
            assert time.monotonic() < deadline, "a hold was never settled"
            time.sleep(0.01)

    def counts(self) -> tuple[int, ...]:
        with sqlite3.connect(self.db_path, timeout=10) as conn:
            return tuple(
                int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                for table in COUNTED_TABLES
            )


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The gateway and its fake upstream, served by uvicorn in a thread of their own."""
    db_path = tmp_path_factory.mktemp("fuzz") / "gateway.sqlite"
    upstream_sock, gateway_sock = _free_socket(), _free_socket()
    upstream_url = f"http://127.0.0.1:{upstream_sock.getsockname()[1]}/v1"
    root = f"http://127.0.0.1:{gateway_sock.getsockname()[1]}"
    app = create_app(
        Settings(
            upstream_base_url=upstream_url,
            upstream_api_key=Secret(FAKE_UPSTREAM_KEY),
            upstream_timeout_seconds=5.0,
            database_url=f"sqlite:///{db_path}",
            api_token=Secret(SERVICE_TOKEN),
            stripe_webhook_secret=Secret(WEBHOOK_SECRET),
            gate_lease_requests=0,
        )
    )
    servers = [
        uvicorn.Server(uvicorn.Config(_SturdyUpstream(), log_level="warning", ws="none")),
        uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none", lifespan="on")),
    ]
    loop = asyncio.new_event_loop()

    async def serve_both() -> None:
        await asyncio.gather(
            servers[0].serve(sockets=[upstream_sock]), servers[1].serve(sockets=[gateway_sock])
        )

    thread = threading.Thread(target=loop.run_until_complete, args=(serve_both(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not all(server.started for server in servers):
        assert time.monotonic() < deadline, "the servers did not start"
        time.sleep(0.02)
    service = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    with httpx.Client(base_url=root, timeout=10) as http:
        http.post(
            f"/v1/admin/practices/{PRACTICE}/licenses",
            headers=service,
            json={"plan": "aza_team_monthly"},
        ).raise_for_status()
        made = http.post(f"/v1/admin/practices/{PRACTICE}/keys", headers=service, json={})
        made.raise_for_status()
        key = made.json()["key"]
    tracebacks = _Tracebacks()
    logging.getLogger().addHandler(tracebacks)
    try:
        yield Live(root, key, db_path, tracebacks)
    finally:
        logging.getLogger().removeHandler(tracebacks)
        for server in servers:
            server.should_exit = True
        thread.join(timeout=20)
        loop.close()
        upstream_sock.close()
        gateway_sock.close()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def http(live: Live) -> Iterator[httpx.Client]:
    """The client; after the module, the process (gateway included) grew by less than 64 MB."""
    start = _rss_bytes()
    with httpx.Client(base_url=live.root, timeout=15) as client:
        yield client
    grown = _rss_bytes() - start
    assert grown < MEMORY_BOUND_BYTES, f"resident memory grew by {grown} bytes"


def check(live: Live, group: str, send: Any) -> httpx.Response:
    """Send one case; judge status, log and (for a refusal) the database."""
    RAN[group] = RAN.get(group, 0) + 1
    before = live.settled_counts()
    seen = len(live.tracebacks.records)
    response: httpx.Response = send()
    assert response.status_code < 500, (response.status_code, response.text[:500])
    # The error shape: every 4xx the gateway answers is OpenAI's.
    json_error = response.headers.get("content-type", "").startswith("application/json")
    if response.status_code >= 400 and json_error and response.request.method != "HEAD":
        assert isinstance(response.json().get("error"), dict)
    new = live.tracebacks.records[seen:]
    assert not new, [record.getMessage() for record in new]
    if response.status_code >= 400:
        assert live.counts() == before, "a refused request wrote to the database"
    return response


# -- strategies ------------------------------------------------------------------------------

_text = st.text(max_size=40)
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=25,
)
_models = st.sampled_from(["gpt-4o-mini", "gpt-4o", "no-such-model", "", "ü" * 5])
_keys = st.sampled_from(
    [
        "model",
        "messages",
        "input",
        "stream",
        "stream_options",
        "max_tokens",
        "n",
        "store",
        "max_completion_tokens",
        "prompt",
        "tools",
        "service_tier",
        "modalities",
    ]
)
_request_objects = st.builds(
    lambda model, extra, messages: {"model": model, "messages": messages, **extra},
    _models,
    st.dictionaries(_keys, _json, max_size=5),
    st.one_of(
        _json,
        st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": _json}),
            max_size=3,
        ),
    ),
)


def _deep(depth: int) -> str:
    return "[" * depth + '"x"' + "]" * depth


_bodies = st.one_of(
    _request_objects.map(lambda obj: json.dumps(obj, allow_nan=True).encode()),
    _json.map(lambda obj: json.dumps(obj, allow_nan=True).encode()),
    st.binary(max_size=2048),
    st.integers(min_value=50, max_value=20_000).map(
        lambda d: (
            '{"model":"gpt-4o-mini","messages":[{"role":"user","content":' + _deep(d) + "}]}"
        ).encode()
    ),
)
_content_types = st.sampled_from(
    [
        "application/json",
        "text/plain",
        "",
        "application/json; charset=latin-1",
        "multipart/form-data",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
    ]
)


def _auth(key: str) -> st.SearchStrategy[dict[str, str]]:
    return st.sampled_from(
        [
            {"Authorization": f"Bearer {key}"},
            {"Authorization": f"Bearer {key}", "X-Practice-Id": "someone_else"},
            {"Authorization": f"Bearer {SERVICE_TOKEN}", "X-Practice-Id": PRACTICE},
            {"Authorization": f"Bearer {SERVICE_TOKEN}"},
            {"Authorization": "Bearer aza_wrong"},
            {"Authorization": "Basic Zm9vOmJhcg=="},
            {},
        ]
    )


_segment_chars = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=12
)


def _encode_segment(raw: str, mode: int) -> str:
    if mode == 0:
        return raw
    out = []
    for ch in raw:
        if ch.isascii() and (ch.isalnum() or ch in "-._~") and mode == 1:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode())
    return "".join(out)


_paths = st.builds(
    lambda prefix, segs, mode: prefix + "/".join(_encode_segment(s, mode) for s in segs),
    st.sampled_from(
        ["/v1/", "/v1/models/", "/v1/chat/completions/", "/v1/ai-credit/", "/v1/admin/", "/"]
    ),
    st.lists(
        st.one_of(_segment_chars, st.sampled_from([".", "..", "%2e%2e", "%2F", "", "files"])),
        max_size=4,
    ),
    st.integers(min_value=0, max_value=2),
)


def _safe_target(path: str) -> str:
    """A request target httpx sends as given: non-printable and non-ASCII characters escaped."""
    return "".join(
        ch
        if ch.isascii() and 0x21 <= ord(ch) < 0x7F and ch not in "?#"
        else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        for ch in path
    )


# -- the cases -----------------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(
    path=st.sampled_from(
        ["/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/completions"]
    ),
    body=_bodies,
    content_type=_content_types,
    data=st.data(),
)
def test_proxied_bodies(
    live: Live, http: httpx.Client, path: str, body: bytes, content_type: str, data: st.DataObject
) -> None:
    """JSON of any shape, raw bytes and deep nesting to the metered JSON endpoints."""
    headers = {**data.draw(_auth(live.key)), "Content-Type": content_type}
    check(live, "proxied bodies", lambda: http.post(path, content=body, headers=headers))


_part_names = st.sampled_from(["file", "model", "prompt", "stream", "language", "x", "", 'fi"le'])
_parts = st.lists(
    st.tuples(_part_names, st.one_of(st.none(), _text), st.binary(max_size=512), _content_types),
    max_size=5,
)


@FUZZ_SETTINGS
@given(parts=_parts, boundary=st.sampled_from(["b0undary", "x", "--", "a" * 70]), data=st.data())
def test_proxied_multipart(
    live: Live,
    http: httpx.Client,
    parts: list[tuple[str, str | None, bytes, str]],
    boundary: str,
    data: st.DataObject,
) -> None:
    """Multipart audio uploads with odd part names, filenames, types and contents."""
    chunks = []
    for name, filename, content, ctype in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        head = (
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {ctype}\r\n\r\n"
        )
        chunks.append(head.encode("utf-8", "surrogateescape") + content + b"\r\n")
    body = b"".join(chunks) + (f"--{boundary}--\r\n".encode() if data.draw(st.booleans()) else b"")
    headers = {
        **data.draw(_auth(live.key)),
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }
    path = data.draw(st.sampled_from(["/v1/audio/transcriptions", "/v1/audio/translations"]))
    check(live, "multipart", lambda: http.post(path, content=body, headers=headers))


@FUZZ_SETTINGS
@given(
    path=_paths,
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"]),
    query=st.one_of(st.just(""), st.text(alphabet="abc=&%2e0123456789²", max_size=12)),
    data=st.data(),
)
def test_paths_and_methods(
    live: Live, http: httpx.Client, path: str, method: str, query: str, data: st.DataObject
) -> None:
    """Any path below /v1 (encoded or not, dot segments, empty ones) with any method."""
    headers = data.draw(_auth(live.key))
    target = _safe_target(path) + (("?" + _safe_target(query)) if query else "")
    url = httpx.URL(live.root).copy_with(raw_path=target.encode("ascii"))
    response = check(live, "paths", lambda: http.request(method, url, headers=headers))
    if response.status_code == 200 and method in ("GET", "HEAD"):
        # Only the models endpoints answer a GET from the upstream.
        assert path.startswith(
            ("/v1/models", "/v1/ai-credit/", "/v1/admin/", "/v1/chat/completions")
        )


@FUZZ_SETTINGS
@given(
    route=st.sampled_from(
        [
            ("POST", "/v1/ai-credit/topup/checkout"),
            ("PUT", "/v1/ai-credit/auto-topup/settings"),
            ("POST", "/v1/ai-credit/auto-topup/setup"),
            ("GET", "/v1/ai-credit/history"),
            ("GET", "/v1/ai-credit/budget"),
        ]
    ),
    body=_bodies,
    query=st.dictionaries(st.sampled_from(["limit", "x", "after"]), _text, max_size=2),
    content_type=_content_types,
    data=st.data(),
)
def test_credit_routes(
    live: Live,
    http: httpx.Client,
    route: tuple[str, str],
    body: bytes,
    query: dict[str, str],
    content_type: str,
    data: st.DataObject,
) -> None:
    """The practice routes with any body and query (dry run: nothing is charged)."""
    method, path = route
    headers = {**data.draw(_auth(live.key)), "Content-Type": content_type}
    content = body if method != "GET" else None
    check(
        live,
        "credit",
        lambda: http.request(method, path, content=content, params=query, headers=headers),
    )


@FUZZ_SETTINGS
@given(
    route=st.sampled_from(
        [
            ("POST", "/v1/admin/practices/{p}/adjustments"),
            ("POST", "/v1/admin/practices/{p}/licenses"),
            ("GET", "/v1/admin/practices/{p}/ledger"),
            ("GET", "/v1/admin/practices/{p}/keys"),
            ("DELETE", "/v1/admin/keys/{p}"),
        ]
    ),
    practice=st.one_of(
        st.just("prac_other"), _segment_chars.filter(lambda s: s.isascii() and s.isalnum())
    ),
    body=_bodies,
    data=st.data(),
)
def test_admin_routes(
    live: Live,
    http: httpx.Client,
    route: tuple[str, str],
    practice: str,
    body: bytes,
    data: st.DataObject,
) -> None:
    """Admin routes with any body, for practices that exist or not (never the fuzz practice)."""
    method, template = route
    path = template.format(p=practice or "x")
    headers = {**data.draw(_auth(live.key)), "Content-Type": "application/json"}
    content = body if method == "POST" else None
    check(live, "admin", lambda: http.request(method, path, content=content, headers=headers))


def _signed(payload: bytes, when: int) -> str:
    mac = hmac.new(WEBHOOK_SECRET.encode(), f"{when}.".encode() + payload, hashlib.sha256)
    return f"t={when},v1={mac.hexdigest()}"


_event_types = st.sampled_from(
    [
        "checkout.session.completed",
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "charge.refunded",
        "customer.subscription.updated",
        "setup_intent.succeeded",
        "unknown.event",
    ]
)
_events = st.builds(
    lambda event_type, obj, ident, created: {
        "id": ident,
        "object": "event",
        "type": event_type,
        "created": created,
        "data": {"object": obj},
    },
    _event_types,
    st.one_of(
        _json,
        st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "metadata",
                    "payment_intent",
                    "amount_refunded",
                    "status",
                    "items",
                    "customer",
                ]
            ),
            _json,
            max_size=6,
        ),
    ),
    st.one_of(_text, st.integers()),
    st.one_of(st.integers(), st.none(), _text),
)


@FUZZ_SETTINGS
@given(
    payload=st.one_of(_events.map(lambda e: json.dumps(e, allow_nan=True).encode()), _bodies),
    signing=st.sampled_from(["valid", "stale", "garbage", "none"]),
)
def test_webhook(live: Live, http: httpx.Client, payload: bytes, signing: str) -> None:
    """Stripe webhooks with fuzzed events, validly signed or not."""
    now = int(time.time())
    headers: dict[str, str] = {}
    if signing == "valid":
        headers["Stripe-Signature"] = _signed(payload, now)
    elif signing == "stale":
        headers["Stripe-Signature"] = _signed(payload, now - 3600)
    elif signing == "garbage":
        headers["Stripe-Signature"] = "t=1,v1=00"
    response = check(
        live, "webhook", lambda: http.post("/v1/stripe/webhook", content=payload, headers=headers)
    )
    if signing != "valid":
        assert response.status_code == 400


def test_fuzz_case_count() -> None:
    """Every group ran its cases (printed for the CI log)."""
    total = sum(RAN.values())
    print(f"\nfuzz cases run: {total} ({', '.join(f'{k} {v}' for k, v in sorted(RAN.items()))})")
    assert total >= EXAMPLES * 6 or not RAN
