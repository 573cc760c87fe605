"""Shipped configuration: prices, plans and defaults (TOML files beside this module)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
