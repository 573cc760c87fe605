"""The output limit the gateway sets on a request that names none (issue 12, item 8).

A chat, completion or Responses request without `max_completion_tokens` /
`max_tokens` / `max_output_tokens` could otherwise produce far more output
than its hold reserved, and near an empty budget a burst of them overspends
the practice. The rule:

- the request is held for `default_max_output_tokens` of output (per choice)
  and forwarded with exactly that limit set, so it cannot cost more than
  its hold (up to the input estimate, see below);
- when the practice's available money does not cover that, the limit is cut
  to the most output tokens the money still affords (found here), held and
  forwarded so; below `MIN_OUTPUT_TOKENS` the request is refused with the
  usual 429;
- the response says which limit the gateway set in `x-aza-max-output-tokens`.

What is left over the hold is the input estimate's error alone (the hold
counts ceil(characters / 4) + 8 input tokens, the upstream the real ones).
Requests that name a limit are held for that limit and forwarded unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from budget.operations import Operation

# Where each operation takes its output limit (OpenAI's names).
OUTPUT_LIMIT_FIELD: Mapping[Operation, str] = MappingProxyType(
    {
        Operation.CHAT: "max_completion_tokens",
        Operation.COMPLETION: "max_tokens",
        Operation.RESPONSES: "max_output_tokens",
    }
)
# The smallest limit worth forwarding (OpenAI's minimum for max_output_tokens).
MIN_OUTPUT_TOKENS = 16
RESPONSE_HEADER = "x-aza-max-output-tokens"


# The `store: false` the gateway splices in first (budget/request.py); an Azure
# upstream takes it off again by that exact prefix (gateway/routing.py), so the
# limit goes after it, never between.
_STORE_FALSE_FIRST = b'{"store":false,'


def with_output_limit(body: bytes, field: str, tokens: int) -> bytes:
    """`body` (a JSON object without `field`) with `"field": tokens` added at its start."""
    stripped = body.lstrip()
    if not stripped.startswith(b"{"):
        raise ValueError("not a JSON object")
    member = b'"' + field.encode() + b'":' + str(tokens).encode() + b","
    if stripped.startswith(_STORE_FALSE_FIRST):
        return _STORE_FALSE_FIRST + member + stripped[len(_STORE_FALSE_FIRST) :]
    return b"{" + member + stripped[1:]


def affordable_output_tokens(
    cost_micros: Callable[[int], int], available_micros: int, *, most: int, least: int
) -> int | None:
    """The most output tokens in [least, most] whose cost fits `available_micros`, or None.

    `cost_micros(tokens)` is the request's whole estimate (input included) with
    `tokens` of output per choice; it grows with `tokens`.
    """
    least = min(least, most)
    if cost_micros(least) > available_micros:
        return None
    low, high = least, most
    while low < high:
        middle = (low + high + 1) // 2
        if cost_micros(middle) <= available_micros:
            low = middle
        else:
            high = middle - 1
    return low
