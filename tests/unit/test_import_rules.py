"""The layering docs/architecture.md draws, held by the imports themselves.

- `budget/` (pure metering rules) imports neither `credit/` nor `gateway/`;
- `credit/` never imports `gateway/`;
- the engine-neutral metering store (`gateway/storage/` but the two engine
  modules) imports no engine module: it asks `gateway.storage.engine`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINES = {"gateway.storage.postgres", "gateway.storage.sqlite"}


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """Modules under `folder` that import a package in `forbidden`, with what they import."""
    bad = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        hits = {m for m in imports_of(path) if m.split(".")[0] in forbidden}
        if hits:
            bad[module] = sorted(hits)
    return bad


def test_budget_imports_neither_credit_nor_gateway() -> None:
    """The pure metering rules stand alone."""
    assert offenders("budget", ("credit", "gateway")) == {}


def test_credit_never_imports_gateway() -> None:
    """Credit is below the gateway: configuration and stores come in as arguments."""
    assert offenders("credit", ("gateway",)) == {}


def test_the_shared_store_imports_no_engine() -> None:
    """Engine differences are asked of the engine (gateway.storage.engine), never imported."""
    storage = ROOT / "gateway" / "storage"
    bad = {}
    for path in sorted(storage.glob("*.py")):
        module = f"gateway.storage.{path.stem}"
        if module in ENGINES or path.stem == "__init__":  # __init__ opens the engines
            continue
        hits = sorted(imports_of(path) & ENGINES)
        if hits:
            bad[module] = hits
    assert bad == {}
