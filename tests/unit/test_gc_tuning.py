"""`aza-gateway serve` keeps the cyclic garbage collector out of the request path."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.cli import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_startup_objects_are_frozen_and_collections_are_rarer(restore_gc: None) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    tune_gc()
    assert gc.get_freeze_count() > 1000  # modules, the app, the price book ...
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 700  # Python's default collects every 700 allocations
    # Cycles are still collected.
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1
