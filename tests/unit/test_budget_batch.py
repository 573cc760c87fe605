"""Batch input lines checked and estimated, output lines read (budget.batch, pure)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from budget.batch import (
    BATCH_TIER,
    BatchEstimator,
    InvalidBatchLine,
    output_line_usage,
)
from budget.operations import Operation
from budget.pricing import PriceBook
from budget.usage import Usage
from config import CONFIG_DIR

PRICES = PriceBook.load(CONFIG_DIR / "prices.toml")


def request(n: int, **body: Any) -> bytes:
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 40}]}
    payload.update(body)
    line = {"custom_id": f"c{n}", "method": "POST", "url": "/v1/chat/completions", "body": payload}
    return json.dumps(line).encode()


def estimator() -> BatchEstimator:
    return BatchEstimator(
        "/v1/chat/completions", cost_micros=PRICES.cost_micros, default_max_output_tokens=100
    )


def test_lines_are_estimated_at_the_batch_price() -> None:
    """Each line's estimate is priced at the batch tier: half the standard price here."""
    seen = estimator()
    for n in range(10):
        seen.feed(request(n, max_tokens=50))
    seen.feed(b"   ")  # blank lines are skipped, not counted
    result = seen.result()
    one = Usage(Operation.CHAT, "gpt-4o-mini", input_tokens=18, output_tokens=50)
    assert result.lines == 10 and result.model == "gpt-4o-mini"
    batch_cost = PRICES.cost_usd(replace(one, service_tier=BATCH_TIER))
    assert PRICES.cost_usd(one) == 2 * batch_cost
    per_line = PRICES.cost_micros(replace(one, service_tier=BATCH_TIER, estimated=True))
    assert result.estimate_micros == 10 * per_line


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"[1, 2]", "invalid_json_line"),
        (b'{"custom_id": "c1", "method": "GET", "url": "/v1/chat/completions", "body": {}}', None),
        (request(0), None),  # custom_id used twice
        (request(1, model="gpt-4o"), "model_mismatch"),
        (request(1, stream=True), None),
        (request(1, max_tokens=-1), None),
    ],
)
def test_the_first_line_it_cannot_meter_is_named(line: bytes, code: str | None) -> None:
    seen = estimator()
    seen.feed(request(0))
    with pytest.raises(InvalidBatchLine) as refused:
        seen.feed(line)
    assert refused.value.line == 2 and refused.value.message.startswith("Line 2 ")
    if code is not None:
        assert refused.value.code == code


def test_a_model_without_batch_prices_and_an_empty_file_are_refused() -> None:
    seen = BatchEstimator(
        "/v1/embeddings", cost_micros=PRICES.cost_micros, default_max_output_tokens=100
    )
    line = {
        "custom_id": "e",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "no-such-embedding", "input": "Befund"},
    }
    with pytest.raises(InvalidBatchLine, match="cannot be priced"):
        seen.feed(json.dumps(line).encode())
    with pytest.raises(InvalidBatchLine) as empty:
        estimator().result()
    assert empty.value.code == "empty_batch"


def test_output_lines_give_usage_at_the_batch_tier_and_failures_none() -> None:
    ok = {
        "custom_id": "c1",
        "response": {
            "status_code": 200,
            "body": {
                "model": "gpt-4o-mini",
                "usage": {"prompt_tokens": 12, "completion_tokens": 7},
            },
        },
        "error": None,
    }
    failed = {"custom_id": "c2", "response": None, "error": {"code": "x", "message": "y"}}
    read = output_line_usage(json.dumps(ok).encode(), operation=Operation.CHAT, model="gpt-4o-mini")
    assert read is not None and read.completed and read.usage is not None
    assert (read.usage.input_tokens, read.usage.output_tokens) == (12, 7)
    assert read.usage.service_tier == BATCH_TIER
    gone = output_line_usage(
        json.dumps(failed).encode(), operation=Operation.CHAT, model="gpt-4o-mini"
    )
    assert gone is not None and not gone.completed and gone.usage is None
    assert output_line_usage(b"garbage", operation=Operation.CHAT, model="m") is None
