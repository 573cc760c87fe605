"""Settings: read once from the environment and config/, refused with a clear message when wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from config import CONFIG_DIR
from gateway.settings import ConfigError, Settings


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
    ],
)
def test_a_wrong_environment_value_names_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)
