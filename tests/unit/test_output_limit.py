"""The output limit set on requests that name none: the body splice and the affordable search."""

from __future__ import annotations

import json

import pytest

from budget.output_limit import affordable_output_tokens, with_output_limit


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
