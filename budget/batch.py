"""Batch API lines: what a batch's input file asks for, and what its output file used.

A batch's input file is JSONL, one request a line:
`{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`.
`BatchEstimator` checks each line as the gateway reads the file (a JSON
object, a unique custom_id, POST to the batch's endpoint, the batch's one
model, a body the gateway can meter and price) and adds up its estimate; the
first line it cannot meter raises `InvalidBatchLine` naming it. An output
line `{"custom_id", "response": {"status_code", "body"}, "error"}` is read by
`output_line_usage`: a completed line's usage, charged at the batch tier.

Nothing here does I/O; the caller feeds it lines as bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from budget.estimate import estimate_usage
from budget.operations import Operation
from budget.request import InvalidRequest, RequestInfo, parse_request
from budget.response import usage_from_response
from budget.usage import Usage

BATCH_TIER = "batch"
# The endpoints a batch may run, as OpenAI's Batch API allows them.
BATCH_ENDPOINTS: Mapping[str, Operation] = MappingProxyType(
    {
        "/v1/chat/completions": Operation.CHAT,
        "/v1/completions": Operation.COMPLETION,
        "/v1/responses": Operation.RESPONSES,
        "/v1/embeddings": Operation.EMBEDDING,
        "/v1/moderations": Operation.MODERATION,
    }
)
# OpenAI's limits of one batch input file.
MAX_BATCH_LINES = 50_000
MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024
# A line longer than this is refused before it is parsed.
MAX_LINE_BYTES = 8 * 1024 * 1024


class InvalidBatchLine(Exception):
    """A line of a batch input file the gateway cannot meter; `line` counts from 1."""

    def __init__(self, line: int, message: str, *, code: str = "invalid_batch_line") -> None:
        super().__init__(f"Line {line} of the input file: {message}")
        self.line = line
        self.message = f"Line {line} of the input file: {message}"
        self.code = code


@dataclass(frozen=True, slots=True)
class BatchEstimate:
    """The checked input file: its lines, its model and the hold for all of them (micro-USD)."""

    lines: int
    model: str
    estimate_micros: int


class BatchEstimator:
    """Checks a batch's input lines one at a time and sums their estimates at the batch price.

    `cost_micros` prices a usage (raising `budget.pricing.UnpricedModel` when it
    cannot); `check_model` refuses a model the gateway does not serve (the HTTP
    path's rules), raising anything with a `message`.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        cost_micros: Callable[[Usage], int],
        default_max_output_tokens: int,
    ) -> None:
        operation = BATCH_ENDPOINTS.get(endpoint)
        if operation is None:
            raise ValueError(f"not a batch endpoint: {endpoint}")
        self.endpoint = endpoint
        self.operation = operation
        self._cost = cost_micros
        self._default_max_output = default_max_output_tokens
        self._custom_ids: set[str] = set()
        self._lines = 0
        self._numbered = 0
        self._model: str | None = None
        self._micros = 0

    def feed(self, raw: bytes) -> None:
        """Check one line (without its newline) and add its estimate; blank lines are skipped."""
        self._numbered += 1
        number = self._numbered
        if not raw.strip():
            return
        if len(raw) > MAX_LINE_BYTES:
            raise InvalidBatchLine(number, f"longer than {MAX_LINE_BYTES} bytes")
        self._lines += 1
        if self._lines > MAX_BATCH_LINES:
            raise InvalidBatchLine(
                number, f"a batch holds at most {MAX_BATCH_LINES} requests", code="too_many_lines"
            )
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise InvalidBatchLine(number, "not a JSON object", code="invalid_json_line")
        custom_id = data.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise InvalidBatchLine(number, "custom_id must be a non-empty string")
        if custom_id in self._custom_ids:
            raise InvalidBatchLine(number, f"custom_id {custom_id!r} is used twice")
        if data.get("method") != "POST":
            raise InvalidBatchLine(number, "method must be POST")
        if data.get("url") != self.endpoint:
            raise InvalidBatchLine(
                number,
                f"url {data.get('url')!r} is not the batch's endpoint {self.endpoint}",
                code="endpoint_mismatch",
            )
        body = data.get("body")
        if not isinstance(body, dict):
            raise InvalidBatchLine(number, "body must be a JSON object")
        if body.get("stream") is True:
            raise InvalidBatchLine(number, "a batch request cannot stream")
        try:
            info, _ = parse_request(self.operation, "application/json", json.dumps(body).encode())
        except InvalidRequest as exc:
            raise InvalidBatchLine(number, exc.message) from None
        if self._model is None:
            self._model = info.model
        elif info.model != self._model:
            raise InvalidBatchLine(
                number,
                f"model {info.model!r} differs from the batch's model {self._model!r}",
                code="model_mismatch",
            )
        estimate = replace(
            estimate_usage(info, default_max_output_tokens=self._default_max_output),
            service_tier=BATCH_TIER,
        )
        try:
            self._micros += self._cost(estimate)
        except Exception as exc:  # UnpricedModel, or the caller's model rule
            detail = getattr(exc, "message", None) or str(exc)
            raise InvalidBatchLine(
                number, f"cannot be priced at the batch price ({detail})", code="model_not_priced"
            ) from None
        self._custom_ids.add(custom_id)

    def result(self) -> BatchEstimate:
        """The whole file's estimate; InvalidBatchLine(0) for a file without requests."""
        if self._model is None:
            raise InvalidBatchLine(0, "the file holds no requests", code="empty_batch")
        return BatchEstimate(lines=self._lines, model=self._model, estimate_micros=self._micros)


@dataclass(frozen=True, slots=True)
class OutputLine:
    """One line of a batch's output or error file: its custom_id and, if it completed, usage."""

    custom_id: str
    usage: Usage | None  # None: the line failed (never charged) or reported no usage
    completed: bool


def output_line_usage(raw: bytes, *, operation: Operation, model: str) -> OutputLine | None:
    """A completed line's usage (at the batch tier), a failed line, or None for a blank or
    unreadable line. A completed line without usage has `usage` None and `completed` True."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("custom_id"), str):
        return None
    custom_id: str = data["custom_id"]
    response = data.get("response")
    if not isinstance(response, dict) or response.get("status_code") != 200:
        return OutputLine(custom_id, None, completed=False)
    body = response.get("body")
    usage = None
    if isinstance(body, dict):
        info = RequestInfo(operation=operation, model=model)
        usage = usage_from_response(info, json.dumps(body).encode())
    if usage is not None:
        usage = replace(usage, service_tier=BATCH_TIER, estimated=False)
    return OutputLine(custom_id, usage, completed=True)
