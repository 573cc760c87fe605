"""Configuration, read once at start into frozen objects and passed in.

Nothing below `gateway/` reads the environment: `Settings.from_env()` is the
one place that does, and the app, the credit services and the CLI get the
result. Secrets are wrapped in `Secret` so a stray log line or repr shows
`Secret('***')`, never the value.
"""

from __future__ import annotations

import functools
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from budget.money import InvalidAmount, parse_decimal
from budget.pricing import PlanBook, PriceBook
from config import CONFIG_DIR
from credit.config import CreditConfig
from gateway.messages import LANGUAGES, Language

if TYPE_CHECKING:
    from gateway.upstreams_config import UpstreamConfig

DEFAULT_UPSTREAM = "https://api.openai.com/v1"
DEFAULT_DATABASE_URL = "sqlite:///./data/aza-gateway.sqlite"


def _smtp_url_usable(url: str) -> bool:
    """Whether `url` has an email scheme, a host and a numeric port (if any), so that the
    mailer built from it at start does not fail there with a traceback instead."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        return False
    return parts.scheme in ("smtp", "smtp+starttls", "smtps") and bool(parts.hostname)


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string that never shows itself in repr, str or logs."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


class ConfigError(ValueError):
    """The environment or a config file holds a value the gateway cannot use."""


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1/0 (or true/false), not {raw!r}")


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None


# Where in defaults.toml a field of `FileDefaults` is read.
_GATEWAY = {"section": "gateway"}
_BUDGET = {"section": "budget"}


@dataclass(frozen=True, slots=True)
class FileDefaults:
    """The `Settings` defaults that config/defaults.toml holds, written there once.

    `shipped()` is the shipped file's, and the defaults of `Settings()`; it
    must have every key, or the gateway does not start. A deployment's own
    defaults.toml (AZA_CONFIG_DIR) may set any of them, the rest come from the
    shipped file; the environment overrides some (`Settings.from_env`).
    """

    # [gateway]
    max_request_body_bytes: int = field(metadata=_GATEWAY)
    upstream_timeout_seconds: float = field(metadata=_GATEWAY)
    unpriced_model_policy: Literal["reject", "fallback"] = field(metadata=_GATEWAY)
    fallback_model: str = field(metadata=_GATEWAY)
    user_language: Language = field(metadata=_GATEWAY)
    # [budget]
    default_max_output_tokens: int = field(metadata=_BUDGET)
    hold_ttl_seconds: int = field(metadata=_BUDGET)
    gate_lease_requests: int = field(metadata=_BUDGET)
    gate_lease_seconds: float = field(metadata=_BUDGET)
    period_grace_seconds: int = field(metadata=_BUDGET)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, base: FileDefaults | None = None
    ) -> FileDefaults:
        """The defaults of a defaults.toml's content; keys it lacks come from `base`
        (each is required without one)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            section = f.metadata["section"]
            table = data.get(section, {})
            if f.name not in table:
                if base is None:
                    raise ConfigError(f"defaults.toml: [{section}] {f.name} is missing")
                values[f.name] = getattr(base, f.name)
                continue
            raw = table[f.name]
            convert = {"int": int, "float": float}.get(str(f.type), str)
            try:
                values[f.name] = convert(raw)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"defaults.toml: [{section}] {f.name} must be a {f.type}, not {raw!r}"
                ) from None
        if values["unpriced_model_policy"] not in ("reject", "fallback"):
            raise ConfigError(
                "defaults.toml: [gateway] unpriced_model_policy must be reject or fallback"
            )
        if values["user_language"] not in LANGUAGES:
            raise ConfigError("defaults.toml: [gateway] user_language must be de, fr, it or en")
        return cls(**values)

    @classmethod
    @functools.cache
    def shipped(cls) -> FileDefaults:
        """The shipped defaults (config/defaults.toml)."""
        with (CONFIG_DIR / "defaults.toml").open("rb") as handle:
            return cls.from_mapping(tomllib.load(handle))


# Read once, at import: a shipped file without one of the keys stops the gateway here.
_SHIPPED = FileDefaults.shipped()


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway needs to run, fixed for the life of the process."""

    upstream_base_url: str = DEFAULT_UPSTREAM
    upstream_api_key: Secret = Secret("")
    upstream_timeout_seconds: float = _SHIPPED.upstream_timeout_seconds
    database_url: str = DEFAULT_DATABASE_URL
    database_pool_size: int = 10
    # SQLite commit durability: NORMAL survives a gateway crash; FULL also an
    # OS crash or power loss (an fsync per commit).
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    api_token: Secret = Secret("")
    stripe_secret_key: Secret = Secret("")
    stripe_webhook_secret: Secret = Secret("")
    stripe_api_base: str | None = None
    auto_topup_enabled: bool = False
    topup_dry_run: bool = True
    topup_allow_live: bool = False
    max_request_body_bytes: int = _SHIPPED.max_request_body_bytes
    unpriced_model_policy: Literal["reject", "fallback"] = _SHIPPED.unpriced_model_policy
    fallback_model: str = _SHIPPED.fallback_model
    user_language: Language = _SHIPPED.user_language
    default_max_output_tokens: int = _SHIPPED.default_max_output_tokens
    hold_ttl_seconds: int = _SHIPPED.hold_ttl_seconds
    # Following upstream jobs (batches): polls back off from min to max seconds.
    job_poll_min_seconds: float = 5.0
    job_poll_max_seconds: float = 60.0
    # POST /v1/files: the largest file accepted (OpenAI's limit: 512 MB).
    max_file_bytes: int = 512 * 1024 * 1024
    period_grace_seconds: int = _SHIPPED.period_grace_seconds
    # Budget leases (gateway/storage/leases.py): a gate may hold this many
    # times its estimate, while a practice has at least four times that left,
    # and admit the instance's next requests against it for up to
    # gate_lease_seconds without asking the database. 0 or 1: no leases.
    gate_lease_requests: int = _SHIPPED.gate_lease_requests
    gate_lease_seconds: float = _SHIPPED.gate_lease_seconds
    # In-memory cache of key → practice lookups; a revoked key stops working
    # within this many seconds on every instance.
    auth_cache_seconds: float = 30.0
    # Alerts (gateway/alerts/): email needs both AZA_SMTP_URL and AZA_ALERT_FROM,
    # else email alerts are off (webhooks and the budget route's banner still work).
    smtp_url: Secret = Secret("")
    alert_from: str = ""
    # Webhooks to http:// and to loopback, private or link-local addresses
    # (tests, in-house receivers); off: https to public addresses only.
    alert_webhook_allow_private: bool = False
    alert_poll_seconds: float = 5.0
    alert_retry_base_seconds: float = 30.0
    alert_retry_max_seconds: float = 3600.0
    alert_max_attempts: int = 12
    # Per-key and per-device rate limits count requests and tokens in fixed
    # windows of this many seconds (requests_per_minute is per window).
    rate_limit_window_seconds: float = 60.0
    # Realtime (gateway/realtime.py): `POST /v1/realtime/client_secrets` and
    # `/v1/realtime/sessions` hand a browser a key to OpenAI itself, past the
    # gateway; refused unless the operator turns them on, and then each is
    # charged this fixed amount (an approximation: the gateway never sees
    # what such a session uses).
    realtime_ephemeral_keys: bool = False
    realtime_session_cap_usd: Decimal | None = None
    # How long a Realtime session whose client left waits for the responses
    # it cancelled to report their usage before they are charged at their estimate.
    realtime_drain_seconds: float = 5.0
    log_level: str = "info"
    # uvicorn's per-request access log (AZA_ACCESS_LOG=1). Off by default: a
    # log line and a write per request cost more CPU than the gateway's own
    # work on a short request, and /metrics already counts requests.
    access_log: bool = False
    # The console's session cookies are signed with this (AZA_CONSOLE_SECRET);
    # empty: a random secret per process (sign-ins end at a restart, and
    # several instances need one secret of their own to share sessions).
    console_secret: Secret = Secret("")
    # Where people reach the gateway (AZA_PUBLIC_URL, e.g. https://ai.praxis.ch):
    # Stripe Checkout returns there; by default the console's own request URL.
    public_url: str | None = None
    prices: PriceBook = field(default_factory=lambda: PriceBook.load(CONFIG_DIR / "prices.toml"))
    plans: PlanBook = field(default_factory=lambda: PlanBook.load(CONFIG_DIR / "plans.toml"))
    credit: CreditConfig = field(default_factory=CreditConfig.defaults)
    # Several upstreams (config/upstreams.toml or AZA_UPSTREAMS_FILE); empty:
    # the one upstream of upstream_base_url and upstream_api_key.
    upstreams: tuple[UpstreamConfig, ...] = ()
    # Regions of practices without their own (AZA_DEFAULT_REGIONS); None: any.
    default_regions: frozenset[str] | None = None
    # AZA_UPSTREAM_STORE=allow: a client's explicit `store: true` passes for
    # every practice; by default only for practices allowed on the regions route.
    upstream_store_allowed: bool = False
    # The egress proxy (HTTPS_PROXY, NO_PROXY) and extra trusted CAs (SSL_CERT_FILE).
    https_proxy: str | None = None
    no_proxy: str = ""
    ssl_cert_file: str | None = None

    @property
    def stripe_live_key(self) -> bool:
        """True when the Stripe key moves real money (sk_live_ / rk_live_)."""
        key = self.stripe_secret_key.reveal()
        return key.startswith(("sk_live_", "rk_live_"))

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, config_dir: Path | None = None
    ) -> Settings:
        """Read the environment (default: os.environ) and the config files once."""
        env = os.environ if env is None else env
        folder = Path(env.get("AZA_CONFIG_DIR") or config_dir or CONFIG_DIR)
        defaults: dict[str, Any] = {}
        defaults_file = folder / "defaults.toml"
        if defaults_file.exists():
            with defaults_file.open("rb") as handle:
                defaults = tomllib.load(handle)
        file = FileDefaults.from_mapping(defaults, base=FileDefaults.shipped())
        policy = env.get("AZA_UNPRICED_MODEL_POLICY", file.unpriced_model_policy)
        if policy not in ("reject", "fallback"):
            raise ConfigError(
                f"AZA_UNPRICED_MODEL_POLICY must be reject or fallback, not {policy!r}"
            )
        synchronous = env.get("AZA_SQLITE_SYNCHRONOUS", "NORMAL").upper()
        if synchronous not in ("NORMAL", "FULL"):
            raise ConfigError(f"AZA_SQLITE_SYNCHRONOUS must be NORMAL or FULL, not {synchronous!r}")
        language = env.get("AZA_USER_LANGUAGE", file.user_language)
        if language not in LANGUAGES:
            raise ConfigError(f"AZA_USER_LANGUAGE must be de, fr, it or en, not {language!r}")
        credit = CreditConfig.from_mapping(defaults.get("credit", {}), base=CreditConfig.defaults())
        smtp_url = env.get("AZA_SMTP_URL", "")
        if smtp_url and not _smtp_url_usable(smtp_url):
            raise ConfigError(
                "AZA_SMTP_URL must be smtp://host:port, smtp+starttls://user:pass@host:port "
                "or smtps://user:pass@host:port (the port a number)"
            )
        if not Decimal(0) <= credit.vat_rate < Decimal(100):
            raise ConfigError(
                f"[credit] vat_rate must be a percent from 0 to 100, not {credit.vat_rate}"
            )
        try:
            ZoneInfo(credit.month_timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"[credit] month_timezone must be a time zone such as Europe/Zurich, "
                f"not {credit.month_timezone!r}"
            ) from None
        from gateway.upstreams_config import load_upstreams, parse_regions

        upstreams_file = env.get("AZA_UPSTREAMS_FILE") or None
        upstreams: tuple[UpstreamConfig, ...] = ()
        if upstreams_file is not None:
            upstreams = load_upstreams(Path(upstreams_file), env)
        elif (folder / "upstreams.toml").exists():
            upstreams = load_upstreams(folder / "upstreams.toml", env)
        store = env.get("AZA_UPSTREAM_STORE", "deny").strip().lower() or "deny"
        if store not in ("allow", "deny"):
            raise ConfigError(f"AZA_UPSTREAM_STORE must be allow or deny, not {store!r}")
        proxy = env.get("HTTPS_PROXY") or env.get("https_proxy") or None
        if proxy is not None:
            from gateway.upstream import ProxyConfig

            try:
                ProxyConfig.parse(proxy)
            except ValueError as exc:
                raise ConfigError(f"HTTPS_PROXY: {exc}") from None
        ephemeral = _flag(env, "AZA_REALTIME_EPHEMERAL_KEYS", False)
        cap_raw = env.get("AZA_REALTIME_SESSION_CAP_USD", "").strip()
        session_cap: Decimal | None = None
        if cap_raw:
            try:
                session_cap = parse_decimal(cap_raw, what="AZA_REALTIME_SESSION_CAP_USD")
            except InvalidAmount:
                session_cap = None
            if session_cap is None or session_cap <= 0:  # parse_decimal refuses NaN and ±inf
                raise ConfigError(
                    f"AZA_REALTIME_SESSION_CAP_USD must be an amount above 0, not {cap_raw!r}"
                )
        if ephemeral and session_cap is None:
            raise ConfigError(
                "AZA_REALTIME_EPHEMERAL_KEYS=1 needs AZA_REALTIME_SESSION_CAP_USD, "
                "the amount each ephemeral Realtime session is charged"
            )
        return cls(
            upstreams=upstreams,
            default_regions=parse_regions(env.get("AZA_DEFAULT_REGIONS", "")),
            upstream_store_allowed=store == "allow",
            https_proxy=proxy,
            no_proxy=env.get("NO_PROXY") or env.get("no_proxy") or "",
            ssl_cert_file=env.get("SSL_CERT_FILE") or None,
            upstream_base_url=env.get("AZA_UPSTREAM_BASE_URL", DEFAULT_UPSTREAM).rstrip("/"),
            upstream_api_key=Secret(env.get("OPENAI_API_KEY", "")),
            upstream_timeout_seconds=float(
                env.get("AZA_UPSTREAM_TIMEOUT_SECONDS", file.upstream_timeout_seconds)
            ),
            database_url=env.get("AZA_DATABASE_URL", DEFAULT_DATABASE_URL),
            database_pool_size=_int(env, "AZA_DATABASE_POOL_SIZE", 10),
            sqlite_synchronous=synchronous,  # type: ignore[arg-type]  # checked above
            api_token=Secret(env.get("AZA_API_TOKEN", "")),
            stripe_secret_key=Secret(env.get("STRIPE_SECRET_KEY", "")),
            stripe_webhook_secret=Secret(env.get("STRIPE_WEBHOOK_SECRET", "")),
            stripe_api_base=env.get("AZA_STRIPE_API_BASE") or None,
            auto_topup_enabled=_flag(env, "AZA_AI_AUTO_TOPUP_ENABLED", False),
            # Safe by default: nothing is charged until dry run is switched off.
            topup_dry_run=_flag(env, "AZA_AI_TOPUP_DRY_RUN", True),
            topup_allow_live=_flag(env, "AZA_AI_TOPUP_ALLOW_LIVE", False),
            max_request_body_bytes=_int(
                env, "AZA_MAX_REQUEST_BODY_BYTES", file.max_request_body_bytes
            ),
            unpriced_model_policy=policy,  # type: ignore[arg-type]  # checked above
            fallback_model=env.get("AZA_FALLBACK_MODEL", file.fallback_model),
            user_language=language,
            default_max_output_tokens=file.default_max_output_tokens,
            hold_ttl_seconds=_int(env, "AZA_HOLD_TTL_SECONDS", file.hold_ttl_seconds),
            job_poll_min_seconds=float(env.get("AZA_JOB_POLL_MIN_SECONDS", 5.0)),
            job_poll_max_seconds=float(env.get("AZA_JOB_POLL_MAX_SECONDS", 60.0)),
            max_file_bytes=_int(env, "AZA_MAX_FILE_BYTES", 512 * 1024 * 1024),
            period_grace_seconds=_int(env, "AZA_PERIOD_GRACE_SECONDS", file.period_grace_seconds),
            gate_lease_requests=_int(env, "AZA_GATE_LEASE_REQUESTS", file.gate_lease_requests),
            gate_lease_seconds=float(env.get("AZA_GATE_LEASE_SECONDS", file.gate_lease_seconds)),
            smtp_url=Secret(env.get("AZA_SMTP_URL", "")),
            alert_from=env.get("AZA_ALERT_FROM", ""),
            alert_webhook_allow_private=_flag(env, "AZA_ALERT_WEBHOOK_ALLOW_PRIVATE", False),
            alert_poll_seconds=float(env.get("AZA_ALERT_POLL_SECONDS", 5.0)),
            alert_retry_base_seconds=float(env.get("AZA_ALERT_RETRY_BASE_SECONDS", 30.0)),
            alert_max_attempts=_int(env, "AZA_ALERT_MAX_ATTEMPTS", 12),
            rate_limit_window_seconds=float(env.get("AZA_RATE_LIMIT_WINDOW_SECONDS", 60.0)),
            realtime_ephemeral_keys=ephemeral,
            realtime_session_cap_usd=session_cap,
            log_level=env.get("AZA_LOG_LEVEL", "info"),
            access_log=_flag(env, "AZA_ACCESS_LOG", False),
            console_secret=Secret(env.get("AZA_CONSOLE_SECRET", "")),
            public_url=(env.get("AZA_PUBLIC_URL") or "").rstrip("/") or None,
            prices=PriceBook.load(folder / "prices.toml"),
            plans=PlanBook.load(folder / "plans.toml"),
            credit=credit,
        )
