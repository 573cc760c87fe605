"""Settings: read once from the environment and config/, refused with a clear message when wrong."""

from __future__ import annotations

import shutil
import tomllib
from dataclasses import fields
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from config import CONFIG_DIR
from gateway.settings import ConfigError, FileDefaults, Settings


def month_zone_config(tmp_path: Path, zone: str) -> Path:
    """A copy of config/ whose defaults.toml sets `[credit] month_timezone = zone`."""
    folder = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    defaults = folder / "defaults.toml"
    line = 'month_timezone = "Europe/Zurich"'
    text = defaults.read_text()
    assert text.count(line) == 1
    defaults.write_text(text.replace(line, f'month_timezone = "{zone}"'))
    return folder


def test_the_auto_topup_month_is_zurich_s_by_default() -> None:
    assert Settings.from_env({}).credit.month_timezone == "Europe/Zurich"


def test_another_month_zone_is_read_from_the_config(tmp_path: Path) -> None:
    folder = month_zone_config(tmp_path, "UTC")
    settings = Settings.from_env({"AZA_CONFIG_DIR": str(folder)})
    assert settings.credit.month_timezone == "UTC"


@pytest.mark.parametrize("zone", ["Europe/Zurch", "", "../etc/passwd"])
def test_an_unknown_month_zone_is_refused_at_start(tmp_path: Path, zone: str) -> None:
    folder = month_zone_config(tmp_path, zone)
    with pytest.raises(ConfigError, match="month_timezone"):
        Settings.from_env({"AZA_CONFIG_DIR": str(folder)})


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"AZA_USER_LANGUAGE": "rm"}, "AZA_USER_LANGUAGE"),
        ({"AZA_SQLITE_SYNCHRONOUS": "OFF"}, "AZA_SQLITE_SYNCHRONOUS"),
        ({"AZA_GATE_LEASE_REQUESTS": "many"}, "AZA_GATE_LEASE_REQUESTS"),
        ({"AZA_SMTP_URL": "smtp://mail.test:abc"}, "AZA_SMTP_URL"),
        ({"AZA_SMTP_URL": "smtp+starttls://user:pass@:587"}, "AZA_SMTP_URL"),
        ({"AZA_SMTP_URL": "smtps:mail.test"}, "AZA_SMTP_URL"),
        ({"AZA_SMTP_URL": "mail.test:25"}, "AZA_SMTP_URL"),
    ],
)
def test_a_wrong_environment_value_names_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


def _shipped_defaults() -> dict[str, Any]:
    with (CONFIG_DIR / "defaults.toml").open("rb") as handle:
        return tomllib.load(handle)


def _default_fields() -> list[tuple[str, str]]:
    """(section, key) of every Settings default that config/defaults.toml holds."""
    return [(f.metadata["section"], f.name) for f in fields(FileDefaults)]


def test_settings_defaults_are_the_shipped_files() -> None:
    """Settings() takes each default that defaults.toml holds from the file, not a literal."""
    shipped = _shipped_defaults()
    plain = Settings()
    assert len(_default_fields()) == 10
    for section, key in _default_fields():
        assert getattr(plain, key) == shipped[section][key], key
    # No default the file holds is missing from FileDefaults: every [gateway]
    # and [budget] key of the file is one.
    assert {key for section, key in _default_fields()} == {
        *shipped["gateway"],
        *shipped["budget"],
    }


def test_settings_from_an_empty_environment_equal_the_defaults() -> None:
    """from_env's fallbacks and the field defaults are the same values, field by field
    (the price and plan books, read from the same files, have no equality)."""
    from_env = Settings.from_env({})
    plain = Settings()
    compared = [f.name for f in fields(Settings) if f.name not in ("prices", "plans")]
    assert len(compared) == len(fields(Settings)) - 2
    for name in compared:
        assert getattr(from_env, name) == getattr(plain, name), name


@pytest.mark.parametrize(("section", "key"), _default_fields())
def test_a_key_missing_from_the_shipped_defaults_stops_the_start(section: str, key: str) -> None:
    data = _shipped_defaults()
    del data[section][key]
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key} is missing"):
        FileDefaults.from_mapping(data)


def test_a_deployment_s_defaults_override_the_shipped_ones_key_by_key(tmp_path: Path) -> None:
    """A deployment's defaults.toml (AZA_CONFIG_DIR) may set some keys; the rest are shipped."""
    folder = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (folder / "defaults.toml").write_text(
        '[budget]\nhold_ttl_seconds = 60\n[gateway]\nfallback_model = "gpt-4o-mini"\n'
    )
    settings = Settings.from_env({"AZA_CONFIG_DIR": str(folder)})
    assert settings.hold_ttl_seconds == 60
    assert settings.fallback_model == "gpt-4o-mini"
    assert settings.gate_lease_requests == Settings().gate_lease_requests == 128
    # The environment still wins over either file.
    settings = Settings.from_env({"AZA_CONFIG_DIR": str(folder), "AZA_HOLD_TTL_SECONDS": "30"})
    assert settings.hold_ttl_seconds == 30


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("[budget]\nhold_ttl_seconds = 'soon'", r"\[budget\] hold_ttl_seconds"),
        ("[gateway]\nunpriced_model_policy = 'guess'", r"unpriced_model_policy"),
        ("[gateway]\nuser_language = 'rm'", r"user_language"),
    ],
)
def test_a_wrong_value_in_a_deployment_s_defaults_names_its_key(
    tmp_path: Path, line: str, named: str
) -> None:
    folder = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (folder / "defaults.toml").write_text(line + "\n")
    with pytest.raises(ConfigError, match=named):
        Settings.from_env({"AZA_CONFIG_DIR": str(folder)})


def test_the_realtime_session_cap_is_read_exactly() -> None:
    settings = Settings.from_env(
        {"AZA_REALTIME_EPHEMERAL_KEYS": "1", "AZA_REALTIME_SESSION_CAP_USD": " 0.05 "}
    )
    assert settings.realtime_session_cap_usd == Decimal("0.05")
    assert settings.realtime_ephemeral_keys


@pytest.mark.parametrize("raw", ["abc", "NaN", "inf", "0", "-1", "1,5"])
def test_a_realtime_session_cap_that_is_no_amount_above_zero_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="AZA_REALTIME_SESSION_CAP_USD"):
        Settings.from_env({"AZA_REALTIME_SESSION_CAP_USD": raw})


def test_ephemeral_realtime_keys_need_a_session_cap() -> None:
    with pytest.raises(ConfigError, match="AZA_REALTIME_SESSION_CAP_USD"):
        Settings.from_env({"AZA_REALTIME_EPHEMERAL_KEYS": "1"})


@pytest.mark.parametrize(
    "url",
    ["smtp://mail.test:2525", "smtp+starttls://u%40x.ch:p%40ss@mail.test:587", "smtps://mail.test"],
)
def test_the_three_smtp_url_forms_are_taken(url: str) -> None:
    assert Settings.from_env({"AZA_SMTP_URL": url}).smtp_url.reveal() == url
