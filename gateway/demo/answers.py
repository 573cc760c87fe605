"""What the fake upstream answers to text generation: chat, completions, responses.

Pure functions from a parsed request body to OpenAI's wire format: a JSON
body, or for a streamed request the list of server-sent event frames. Usage
counts about one token per four characters of input (`tokens_for`), the
output text is fixed (`ANSWER`, cut to the request's token limit), and a
streamed chat completion carries its usage chunk only when the request asked
for it with `stream_options.include_usage`, as OpenAI does.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.demo.sse import DONE, sse_data, sse_event

CREATED = 1_700_000_000
ANSWER = "Guten Tag! Dies ist eine Antwort des AzA-Demo-Upstreams."


@dataclass(frozen=True, slots=True)
class Streamed:
    """A streamed answer: its server-sent event frames, in order."""

    chunks: list[bytes]


Answer = dict[str, Any] | Streamed


def tokens_for(text: str) -> int:
    """The fake's token count: about one token per four characters, at least one."""
    return max(1, math.ceil(len(text) / 4))


def error_body(message: str, *, type: str, code: str | None = None) -> dict[str, Any]:
    """An error in OpenAI's shape."""
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def text_of(content: Any) -> str:
    """The text in a message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(text_of(part) for part in content)
    if isinstance(content, Mapping):
        for key in ("text", "content", "input_text"):
            if key in content:
                return text_of(content[key])
    return ""


def words(text: str) -> list[str]:
    """The text cut into stream deltas: each word with the space before it."""
    parts = text.split(" ")
    return [parts[0], *(" " + word for word in parts[1:])]


def _limit(payload: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def answer_text(payload: Mapping[str, Any]) -> tuple[str, int, str]:
    """Output text, its token count and finish reason, within the request's limit."""
    text, limit = ANSWER, _limit(payload)
    if limit is not None and tokens_for(text) > limit:
        return text[: limit * 4], limit, "length"
    return text, tokens_for(text), "stop"


# -- chat and completions ---------------------------------------------------


def _chat_usage(
    prompt: int, completion: int, cached_tokens: int, audio_in: int = 0, audio_out: int = 0
) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt + audio_in,
        "completion_tokens": completion + audio_out,
        "total_tokens": prompt + audio_in + completion + audio_out,
        "prompt_tokens_details": {
            "cached_tokens": min(cached_tokens, prompt),
            "audio_tokens": audio_in,
        },
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": audio_out,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


# The fake's audio tokens: per input_audio part, and per output text token
# spoken (audio takes about 8 tokens per token of its transcript).
AUDIO_TOKENS_PER_INPUT_PART = 120
AUDIO_TOKENS_PER_SPOKEN_TOKEN = 8
FAKE_AUDIO = base64.b64encode(b"RIFF fake wav audio").decode()


def served_tier(payload: Mapping[str, Any]) -> str:
    """The tier that serves a request: the one asked for, "default" for auto or none."""
    tier = payload.get("service_tier")
    return tier if tier in ("priority", "flex", "scale") else "default"


def _input_audio_parts(messages: Any) -> int:
    count = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, Mapping) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, Mapping) and part.get("type") == "input_audio":
                count += 1
    return count


def chat_completion(
    payload: Mapping[str, Any], *, cached_tokens: int = 0, omit_usage: bool = False
) -> Answer:
    """`POST /v1/chat/completions`: one completion, or its chunks when `stream` is set.

    `omit_usage` drops the usage chunk a stream would carry (a failure test's knob).
    """
    model = payload.get("model", "gpt-4o-mini")
    prompt = tokens_for("".join(text_of(m.get("content")) for m in payload.get("messages", [])))
    text, completion, finish = answer_text(payload)
    ident = "chatcmpl-" + hashlib.sha256(text.encode() + str(prompt).encode()).hexdigest()[:24]
    speaks = "audio" in (payload.get("modalities") or [])
    audio_in = AUDIO_TOKENS_PER_INPUT_PART * _input_audio_parts(payload.get("messages"))
    audio_out = completion * AUDIO_TOKENS_PER_SPOKEN_TOKEN if speaks else 0
    usage = _chat_usage(prompt, completion, cached_tokens, audio_in, audio_out)
    tier = served_tier(payload)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text,
        "refusal": None,
        "annotations": [],
    }
    if speaks:
        message["content"] = None
        message["audio"] = {
            "id": "audio_fake",
            "data": FAKE_AUDIO,
            "expires_at": CREATED + 3600,
            "transcript": text,
        }
    if not payload.get("stream"):
        return {
            "id": ident,
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
            "service_tier": tier,
            "system_fingerprint": "fp_fake",
        }
    include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
    base = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "service_tier": tier,
        "system_fingerprint": "fp_fake",
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        body: dict[str, Any] = {
            **base,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            body["usage"] = None
        return sse_data(body)

    chunks = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    if speaks:
        chunks += [
            chunk({"audio": {"id": "audio_fake", "transcript": word}}, None) for word in words(text)
        ]
        chunks.append(chunk({"audio": {"id": "audio_fake", "data": FAKE_AUDIO}}, None))
    else:
        chunks += [chunk({"content": word}, None) for word in words(text)]
    chunks.append(chunk({}, finish))
    if include_usage and not omit_usage:
        chunks.append(sse_data({**base, "choices": [], "usage": usage}))
    chunks.append(DONE)
    return Streamed(chunks)


def completion(payload: Mapping[str, Any]) -> Answer:
    """`POST /v1/completions` (legacy): one text completion."""
    prompt_value = payload.get("prompt", "")
    prompts = prompt_value if isinstance(prompt_value, list) else [prompt_value]
    prompt = tokens_for("".join(str(p) for p in prompts))
    text, used, finish = answer_text(payload)
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": CREATED,
        "model": payload.get("model"),
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": used,
            "total_tokens": prompt + used,
        },
    }


# -- responses --------------------------------------------------------------


def _tool_call_items(tools: Any, ident: str) -> list[dict[str, Any]]:
    """One output item per built-in tool the request offers, as if the model called each."""
    items: list[dict[str, Any]] = []
    for index, tool in enumerate(tools if isinstance(tools, list) else []):
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        item_id = f"{ident}_{index}"
        if isinstance(kind, str) and kind.startswith("web_search"):
            items.append(
                {
                    "id": "ws_" + item_id,
                    "type": "web_search_call",
                    "status": "completed",
                    "action": {"type": "search", "query": "AzA"},
                }
            )
        elif kind == "file_search":
            items.append(
                {
                    "id": "fs_" + item_id,
                    "type": "file_search_call",
                    "status": "completed",
                    "queries": ["AzA"],
                    "results": None,
                }
            )
        elif kind == "code_interpreter":
            items.append(
                {
                    "id": "ci_" + item_id,
                    "type": "code_interpreter_call",
                    "status": "completed",
                    "code": "print(1)",
                    "container_id": "cntr_fake_1",
                    "outputs": None,
                }
            )
    return items


def response(payload: Mapping[str, Any], *, cached_tokens: int = 0) -> Answer:
    """`POST /v1/responses`: one response, or its named events when `stream` is set."""
    model = payload.get("model", "gpt-4o-mini")
    raw_input = payload.get("input", "")
    if isinstance(raw_input, str):
        input_text = raw_input
    else:
        input_text = "".join(text_of(item.get("content", item)) for item in raw_input)
    input_text = str(payload.get("instructions") or "") + input_text
    prompt = tokens_for(input_text)
    text, used, _ = answer_text(payload)
    usage = {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": min(cached_tokens, prompt),
            "cache_write_tokens": 0,
        },
        "output_tokens": used,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + used,
    }
    ident = "resp_" + hashlib.sha256(input_text.encode()).hexdigest()[:24]
    message_id = "msg_" + ident[5:]
    tool_items = _tool_call_items(payload.get("tools"), ident)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {
        "id": message_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }

    def body(status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
        return {
            "id": ident,
            "object": "response",
            "created_at": CREATED,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": payload.get("instructions"),
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "temperature": 1.0,
            "top_p": 1.0,
            "text": {"format": {"type": "text"}},
            "usage": usage if with_usage else None,
            "service_tier": served_tier(payload),
        }

    if not payload.get("stream"):
        return body("completed", [*tool_items, item], True)
    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": body("in_progress", [], False)},
        {"type": "response.in_progress", "response": body("in_progress", [], False)},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **where, "part": {**part, "text": ""}},
    ]
    events += [
        {"type": "response.output_text.delta", **where, "delta": word, "logprobs": []}
        for word in words(text)
    ]
    events += [
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": body("completed", [*tool_items, item], True)},
    ]
    return Streamed(
        [
            sse_event(event["type"], {**event, "sequence_number": number})
            for number, event in enumerate(events)
        ]
    )
