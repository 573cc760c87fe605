"""The output limit set on requests that name none: the body splice and the affordable search."""

from __future__ import annotations

import json

import pytest

from budget.operations import Operation
from budget.output_limit import affordable_output_tokens, with_output_limit
from budget.request import parse_request


def test_the_limit_is_added_to_the_json_object() -> None:
    """The field goes in first; the rest of the body is byte for byte the client's."""
    body = b' \n{"model":"gpt-4o-mini","messages":[]}'
    out = with_output_limit(body, "max_completion_tokens", 512)
    assert out == b'{"max_completion_tokens":512,"model":"gpt-4o-mini","messages":[]}'
    assert json.loads(out)["max_completion_tokens"] == 512
    stored = with_output_limit(b'{"store":false,"model":"m"}', "max_tokens", 8)
    assert stored == b'{"store":false,"max_tokens":8,"model":"m"}'
    with pytest.raises(ValueError):
        with_output_limit(b"[1]", "max_tokens", 1)


@pytest.mark.parametrize("available", [0, 99, 100, 101, 150, 1_000, 10**9])
def test_affordable_tokens_are_the_most_that_fit(available: int) -> None:
    """Largest n in [least, most] with cost(n) <= available, or None when even least is dear."""

    def cost(tokens: int) -> int:
        return 100 + 3 * tokens

    found = affordable_output_tokens(cost, available, most=1000, least=16)
    fits = [n for n in range(16, 1001) if cost(n) <= available]
    assert found == (max(fits) if fits else None)


@pytest.mark.parametrize(
    ("operation", "field"),
    [
        (Operation.CHAT, "max_completion_tokens"),
        (Operation.COMPLETION, "max_tokens"),
        (Operation.RESPONSES, "max_output_tokens"),
    ],
)
def test_a_limit_named_as_null_is_replaced_not_outvoted(operation: Operation, field: str) -> None:
    """`"max_…": null` is no limit: the forwarded body carries the gateway's limit alone."""
    text = {"model": "gpt-4o-mini", field: None, "store": False}
    if operation is Operation.CHAT:
        text["messages"] = [{"role": "user", "content": "Hallo"}]
    else:
        text["input" if operation is Operation.RESPONSES else "prompt"] = "Hallo"
    info, forward = parse_request(operation, "application/json", json.dumps(text).encode())
    assert info.max_output_tokens is None
    sent = json.loads(with_output_limit(forward, field, 300))
    assert sent[field] == 300  # json.loads keeps the last member: the client's null is gone


def test_a_body_with_a_byte_order_mark_takes_the_limit() -> None:
    """A BOM (or whitespace) before the object: the body is written anew, so the splice fits."""
    body = (
        b"\xef\xbb\xbf"
        + json.dumps(
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "Hallo"}],
                "store": True,
            }
        ).encode()
    )
    _info, forward = parse_request(Operation.CHAT, "application/json", body)
    sent = json.loads(with_output_limit(forward, "max_completion_tokens", 300))
    assert sent["max_completion_tokens"] == 300 and sent["store"] is True
