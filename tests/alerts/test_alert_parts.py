"""The pure parts of alerts: signatures, webhook targets, texts in four languages, SMTP URLs."""

from __future__ import annotations

import json

import pytest

from gateway.alerts.delivery import SmtpConfig
from gateway.alerts.events import Alert, AlertType, usd_text
from gateway.alerts.messages import LANGUAGES, email_text, language_of
from gateway.alerts.signing import new_webhook_secret, signature, verify
from gateway.alerts.targets import TargetRefused, check_target, check_url_form


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    """The header is t=<unix>,v1=<hex HMAC-SHA256 of "t.body">, as a receiver recomputes it."""
    import hashlib
    import hmac

    body = json.dumps({"id": "alrt_1"}).encode()
    header = signature("whsec_x", 1_700_000_000, body)
    expected = hmac.new(b"whsec_x", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify("whsec_x", header, body, now=1_700_000_100)
    assert not verify("whsec_y", header, body, now=1_700_000_100)
    assert not verify("whsec_x", header, body + b"x", now=1_700_000_100)
    assert not verify("whsec_x", header, body, now=1_700_001_000)  # too old: a replay
    assert new_webhook_secret() != new_webhook_secret()


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",
        "https://127.0.0.1/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://[::ffff:192.168.1.1]/hook",
        "https://[64:ff9b::7f00:1]/hook",  # NAT64 of 127.0.0.1
        "https://[2002:a00:1::]/hook",  # 6to4 of 10.0.0.1
        "https://[::127.0.0.1]/hook",  # IPv4-compatible loopback
        "https://user:pw@example.com/hook",
        "https://localhost/hook",
        "ftp://example.com/",
    ],
)
async def test_webhook_targets_must_be_public_https(url: str) -> None:
    """Plain http, loopback, private, link-local and mapped addresses, and credentials are
    refused (localhost resolves to loopback)."""
    with pytest.raises(TargetRefused):
        await check_target(url, allow_private=False)


async def test_private_targets_only_when_the_operator_allows() -> None:
    await check_target("https://93.184.215.14/hook", allow_private=False)
    await check_target("https://[64:ff9b::5db8:d70e]/hook", allow_private=False)  # NAT64
    await check_target("https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/", allow_private=False)
    await check_target("http://127.0.0.1:9/hook", allow_private=True)
    with pytest.raises(TargetRefused):
        check_url_form("ftp://127.0.0.1/", allow_private=True)


@pytest.mark.parametrize("kind", list(AlertType))
@pytest.mark.parametrize("language", LANGUAGES)
def test_every_alert_has_a_text_in_every_language(kind: AlertType, language: str) -> None:
    alert = Alert(
        id="alrt_1",
        practice_id="p",
        type=kind,
        created=1,
        period_start=0,
        threshold=80,
        amount_micros=16_000_000,
        limit_micros=20_000_000,
        paid_rappen=3000,
        subject="12",
        reason="key",
    )
    subject, text = email_text(alert, language_of(language))
    assert subject and text and "{" not in subject + text


def test_usd_text_keeps_micro_dollars_exact() -> None:
    assert usd_text(20_000_000) == "20.00"
    assert usd_text(125) == "0.000125"
    assert usd_text(1_500_000) == "1.50"


def test_smtp_urls() -> None:
    """smtp:// plain, smtp+starttls:// with login, smtps:// implicit TLS; anything else refused."""
    plain = SmtpConfig.from_url("smtp://mail.test:2525")
    assert (plain.host, plain.port, plain.tls, plain.starttls, plain.username) == (
        "mail.test",
        2525,
        False,
        False,
        None,
    )
    tls = SmtpConfig.from_url("smtp+starttls://praxis%40x.ch:p%40ss@mail.test:587")
    assert (tls.username, tls.password, tls.starttls) == ("praxis@x.ch", "p@ss", True)
    assert SmtpConfig.from_url("smtps://u:p@mail.test").port == 465
    with pytest.raises(ValueError):
        SmtpConfig.from_url("http://mail.test")


def test_the_console_alert_form_reads_as_the_put_would() -> None:
    """Thresholds as a comma list, empty fields as null, whole numbers as numbers, the
    rest as typed; the refusals of the PUT's checks read in four languages."""
    from starlette.datastructures import FormData

    from gateway.console.alerts import alert_texts, all_entries, form_data, refusal_text
    from gateway.errors import unprocessable

    form = FormData(
        [
            ("budget_used_percent", "90, 75 %, x"),
            ("extra_credit_below_usd", "5,50"),
            ("key_cap_percent", ""),
            ("email", " "),
            ("webhook_url", ""),
            ("language", "it"),
        ]
    )
    assert form_data(form) == {
        "budget_used_percent": [90, 75, "x"],
        "extra_credit_below_usd": "5.50",
        "email": None,
        "webhook_url": None,
        "language": "it",
    }
    error = unprocessable("bad", code="invalid_percent", param="key_cap_percent")
    texts = {lang: refusal_text(error, alert_texts(lang)) for lang in ("de", "fr", "it", "en")}
    assert len(set(texts.values())) == 4
    assert alert_texts("de")["key_cap_percent"] in texts["de"]
    for key, values in all_entries().items():
        assert len(values) == 4 and all(v.strip() for v in values), key
