"""The `aza-gateway` command as users run it: key creation, migrations, and demo mode."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from gateway.settings import Settings


def _command() -> list[str]:
    script = Path(sys.executable).with_name("aza-gateway")
    if script.exists():
        return [str(script)]
    found = shutil.which("aza-gateway")
    if found:
        return [found]
    return [sys.executable, "-m", "gateway.cli"]


def _run(args: list[str], database: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AZA_DATABASE_URL": f"sqlite:///{database}"}
    return subprocess.run(
        [*_command(), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.slow
def test_key_create_prints_the_key_last_and_stores_only_its_hash(tmp_path: Path) -> None:
    """`key create` prints the key alone on its last line; the database holds only its hash."""
    database = tmp_path / "cli.sqlite"
    assert _run(["migrate"], database).returncode == 0
    assert _run(["migrate"], database).returncode == 0  # idempotent
    licensed = _run(
        ["license", "create", "--practice", "p1", "--plan", "aza_basic_monthly"], database
    )
    assert licensed.returncode == 0, licensed.stderr

    result = _run(["key", "create", "--practice", "p1"], database)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"aza_[A-Za-z0-9_-]{43}", key)

    with sqlite3.connect(database) as conn:
        rows = conn.execute(
            "SELECT key_hash, practice_id FROM gateway_keys WHERE role = 'client'"
        ).fetchall()
        licenses = conn.execute("SELECT subscription_id, status FROM licenses").fetchall()
    assert rows == [(hashlib.sha256(key.encode()).hexdigest(), "p1")]
    assert key.encode() not in database.read_bytes()
    [(subscription, status)] = licenses
    assert status == "active" and not subscription.startswith("sub_")

    admin = _run(["key", "create", "--practice", "p1", "--role", "admin"], database)
    assert admin.returncode == 0, admin.stderr
    admin_key = admin.stdout.strip().splitlines()[-1]
    with sqlite3.connect(database) as conn:
        roles = dict(conn.execute("SELECT key_hash, role FROM gateway_keys").fetchall())
    assert roles == {
        hashlib.sha256(key.encode()).hexdigest(): "client",  # the default
        hashlib.sha256(admin_key.encode()).hexdigest(): "admin",
    }
    assert _run(["key", "role", admin_key[:10], "client"], database).returncode == 0
    with sqlite3.connect(database) as conn:
        assert {r for (r,) in conn.execute("SELECT role FROM gateway_keys")} == {"client"}

    assert _run(["verify"], database).returncode == 0
    assert _run(["key", "revoke", key[:10]], database).returncode == 0
    assert _run(["key", "revoke", key[:10]], database).returncode == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
def test_demo_mode_answers_the_sdk_with_the_printed_key(tmp_path: Path) -> None:
    """`aza-gateway demo` starts, prints a key, and answers a chat completion through the SDK."""
    port = _free_port()
    env = {**os.environ, "AZA_DATABASE_URL": f"sqlite:///{tmp_path / 'ignored.sqlite'}"}
    process = subprocess.Popen(
        [*_command(), "demo", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        found: list[str] = []
        printed: dict[str, str] = {}

        def read_key() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                for name, pattern in (
                    ("client", r"Gateway key: (aza_\S+)"),
                    ("admin", r"Admin key: (aza_\S+)"),
                    ("console", r"Console: (http\S+)"),
                ):
                    match = re.match(pattern, line)
                    if match:
                        printed[name] = match.group(1)
                if len(printed) == 3:
                    found.append(printed["client"])
                    return

        reader = threading.Thread(target=read_key, daemon=True)
        reader.start()
        reader.join(timeout=30)
        assert found, "the demo printed no gateway key"
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=found[0], max_retries=0
        ) as client:
            completion = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hallo"}]
            )
        assert completion.choices[0].message.content
        assert completion.usage is not None and completion.usage.total_tokens > 0

        # Buying credit through the demo's Stripe stand-in: its checkout page's Pay sends
        # the signed webhook, and the credit is there.
        assert printed["console"] == f"http://127.0.0.1:{port}/console/"
        admin = {"Authorization": f"Bearer {printed['admin']}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
            assert http.get(printed["console"]).status_code == 200
            checkout = http.post("/v1/ai-credit/topup/checkout", headers=admin, json={})
            assert checkout.status_code == 200, checkout.text
            url = checkout.json()["checkout_url"]
            assert url.startswith(f"http://127.0.0.1:{port}/_stripe/checkout/cs_")
            page = http.get(url)
            assert "CHF 30.00" in page.text
            paid = http.post(url + "/pay")
            assert paid.status_code == 303
            budget = http.get("/v1/ai-credit/budget", headers=admin).json()
            assert budget["extra_credit_remaining_usd"] == 10.0
            [entry] = http.get("/v1/ai-credit/history", headers=admin).json()["items"]
            assert entry["receipt_url"].startswith(f"http://127.0.0.1:{port}/_stripe/receipts/in_")
    finally:
        process.terminate()
        process.wait(timeout=15)
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, False), ({"AZA_ACCESS_LOG": "0"}, False), ({"AZA_ACCESS_LOG": "1"}, True)],
)
def test_serve_writes_the_access_log_only_when_asked(
    environ: dict[str, str], expected: bool
) -> None:
    """`serve` leaves uvicorn's per-request access log off unless AZA_ACCESS_LOG=1."""
    assert Settings.from_env(environ).access_log is expected


def test_a_bad_upstreams_file_stops_the_gateway_naming_the_line(tmp_path: Path) -> None:
    """`serve` with an upstreams file holding an unknown key: exit 2, the file and line named."""
    upstreams = tmp_path / "upstreams.toml"
    upstreams.write_text(
        '[[upstream]]\nname = "eu"\nkind = "openai"\nbase_url = "https://eu.api.openai.com/v1"\n'
        'api_key_env = "OPENAI_EU_KEY"\nregion = "eu"\nretention = "none"\n'
    )
    env = {**os.environ, "AZA_UPSTREAMS_FILE": str(upstreams), "OPENAI_EU_KEY": "sk-eu"}
    result = subprocess.run(
        [*_command(), "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"{upstreams}:7: unknown key 'retention'" in result.stderr
