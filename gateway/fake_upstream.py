"""A fake OpenAI upstream: deterministic answers with realistic usage.

Shipped for demo mode (`aza-gateway demo`) and used by the tests as the
upstream the gateway forwards to, over real HTTP. Answers follow OpenAI's
wire format closely enough for the official SDK: usage counts about one token
per four characters of input, the output text is fixed, and a streamed chat
completion carries its usage chunk only when the request asked for it with
`stream_options.include_usage`, as OpenAI does.

`FakeUpstream` is the ASGI app. Tests steer the next request(s) through its
attributes (fail with a status, hang, pace or cut a stream, omit the usage
chunk) and read back what it received (count, last headers and body).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import math
import random
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

FAKE_UPSTREAM_KEY = "sk-fake-upstream-key"
CREATED = 1_700_000_000
ANSWER = "Guten Tag! Dies ist eine Antwort des AzA-Demo-Upstreams."
TRANSCRIPT = "Dies ist eine Transkription des AzA-Demo-Upstreams."
MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1",
    "text-embedding-3-small",
    "whisper-1",
    "tts-1",
    "dall-e-3",
    "gpt-image-1",
    "omni-moderation-latest",
)
_EMBEDDING_DIMENSIONS = {"text-embedding-3-large": 3072}
# One 1x1 transparent PNG: the image every image request gets.
_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


def tokens_for(text: str) -> int:
    """The fake's token count: about one token per four characters, at least one."""
    return max(1, math.ceil(len(text) / 4))


def _dumps(value: Any) -> bytes:
    # Compact separators, as OpenAI sends them.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _error(status: int, message: str, *, type: str, code: str | None = None) -> Response:
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return Response(_dumps(body), status_code=status, media_type="application/json")


def _text_of(content: Any) -> str:
    """The text in a message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text_of(part) for part in content)
    if isinstance(content, Mapping):
        for key in ("text", "content", "input_text"):
            if key in content:
                return _text_of(content[key])
    return ""


def _words(text: str) -> list[str]:
    """The text cut into stream deltas: each word with the space before it."""
    parts = text.split(" ")
    return [parts[0], *(" " + word for word in parts[1:])]


class FakeUpstream:
    """The fake OpenAI API as an ASGI app, with knobs for failure tests.

    Knobs (plain attributes, read at each request):

    - `errors`: a queue of `(status, json_body)`; each request pops one and
      answers with it instead.
    - `hang_seconds`: sleep this long before answering (gateway timeouts).
    - `chunk_delay`: seconds between the chunks of a stream.
    - `cut_after_chunks`: drop the connection after this many stream chunks.
    - `omit_usage`: never send the usage chunk of a streamed chat completion.
    - `cached_tokens`: report this many of the prompt tokens as cached.

    Records: `requests` (count), `paths`, `last_path`, `last_headers`,
    `last_body`, and for streams `open_streams`, `streams_completed`,
    `streams_abandoned` (the client went away), `streams_cut`,
    `last_chunk_sent_at` (time.monotonic()).
    """

    def __init__(self, *, api_key: str = FAKE_UPSTREAM_KEY) -> None:
        self.api_key = api_key
        self.errors: list[tuple[int, Any]] = []
        self.hang_seconds = 0.0
        self.chunk_delay = 0.0
        self.cut_after_chunks: int | None = None
        self.omit_usage = False
        self.cached_tokens = 0
        self.requests = 0
        self.paths: list[str] = []
        self.last_path: str | None = None
        self.last_headers: dict[str, str] = {}
        self.last_body = b""
        self.open_streams = 0
        self.streams_completed = 0
        self.streams_abandoned = 0
        self.streams_cut = 0
        self.last_chunk_sent_at = 0.0
        self._router = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/audio/transcriptions", self._transcriptions, methods=["POST"]),
                Route("/v1/audio/translations", self._translations, methods=["POST"]),
                Route("/v1/audio/speech", self._speech, methods=["POST"]),
                Route("/v1/images/generations", self._images, methods=["POST"]),
                Route("/v1/moderations", self._moderations, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/models/{model:path}", self._model, methods=["GET"]),
            ]
        )

    @property
    def last_json(self) -> Any:
        return json.loads(self.last_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._router(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        self.requests += 1
        self.last_path = scope["path"]
        self.paths.append(scope["path"])
        self.last_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.last_body = body
        if self.hang_seconds:
            await asyncio.sleep(self.hang_seconds)
        response: Response | None = None
        if self.last_headers.get("authorization") != f"Bearer {self.api_key}":
            response = _error(
                401,
                "Incorrect API key provided.",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        elif self.errors:
            status, payload = self.errors.pop(0)
            response = Response(_dumps(payload), status_code=status, media_type="application/json")
        if response is not None:
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._router(scope, replay, send)

    # -- streams ----------------------------------------------------------

    def _stream(self, chunks: Sequence[bytes]) -> Response:
        return _EventStream(self, chunks)

    # -- chat and completions ---------------------------------------------

    def _chat_usage(self, prompt: int, completion: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {
                "cached_tokens": min(self.cached_tokens, prompt),
                "audio_tokens": 0,
            },
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    @staticmethod
    def _limit(payload: Mapping[str, Any]) -> int | None:
        for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            value = payload.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _answer(self, payload: Mapping[str, Any]) -> tuple[str, int, str]:
        """Output text, its token count and finish reason, within the request's limit."""
        text, limit = ANSWER, self._limit(payload)
        if limit is not None and tokens_for(text) > limit:
            return text[: limit * 4], limit, "length"
        return text, tokens_for(text), "stop"

    async def _chat(self, request: Request) -> Response:
        payload = await request.json()
        model = payload.get("model", "gpt-4o-mini")
        prompt = tokens_for(
            "".join(_text_of(m.get("content")) for m in payload.get("messages", []))
        )
        text, completion, finish = self._answer(payload)
        ident = "chatcmpl-" + hashlib.sha256(text.encode() + str(prompt).encode()).hexdigest()[:24]
        usage = self._chat_usage(prompt, completion)
        if not payload.get("stream"):
            return JSONResponse(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": CREATED,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": text,
                                "refusal": None,
                                "annotations": [],
                            },
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage,
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake",
                }
            )
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "service_tier": "default",
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
            return b"data: " + _dumps(body) + b"\n\n"

        chunks = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
        chunks += [chunk({"content": word}, None) for word in _words(text)]
        chunks.append(chunk({}, finish))
        if include_usage and not self.omit_usage:
            chunks.append(b"data: " + _dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        chunks.append(b"data: [DONE]\n\n")
        return self._stream(chunks)

    async def _completions(self, request: Request) -> Response:
        payload = await request.json()
        prompt_value = payload.get("prompt", "")
        prompts = prompt_value if isinstance(prompt_value, list) else [prompt_value]
        prompt = tokens_for("".join(str(p) for p in prompts))
        text, completion, finish = self._answer(payload)
        return JSONResponse(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": CREATED,
                "model": payload.get("model"),
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
        )

    # -- responses --------------------------------------------------------

    async def _responses(self, request: Request) -> Response:
        payload = await request.json()
        model = payload.get("model", "gpt-4o-mini")
        raw_input = payload.get("input", "")
        if isinstance(raw_input, str):
            input_text = raw_input
        else:
            input_text = "".join(_text_of(item.get("content", item)) for item in raw_input)
        input_text = str(payload.get("instructions") or "") + input_text
        prompt = tokens_for(input_text)
        text, completion, _ = self._answer(payload)
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": min(self.cached_tokens, prompt)},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
        ident = "resp_" + hashlib.sha256(input_text.encode()).hexdigest()[:24]
        message_id = "msg_" + ident[5:]
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = {
            "id": message_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }

        def response(status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
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
            }

        if not payload.get("stream"):
            return JSONResponse(response("completed", [item], True))
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": response("in_progress", [], False)},
            {"type": "response.in_progress", "response": response("in_progress", [], False)},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "status": "in_progress", "content": []},
            },
            {
                "type": "response.content_part.added",
                "item_id": message_id,
                "output_index": 0,
                "content_index": 0,
                "part": {**part, "text": ""},
            },
        ]
        events += [
            {
                "type": "response.output_text.delta",
                "item_id": message_id,
                "output_index": 0,
                "content_index": 0,
                "delta": word,
                "logprobs": [],
            }
            for word in _words(text)
        ]
        events += [
            {
                "type": "response.output_text.done",
                "item_id": message_id,
                "output_index": 0,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            },
            {
                "type": "response.content_part.done",
                "item_id": message_id,
                "output_index": 0,
                "content_index": 0,
                "part": part,
            },
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": response("completed", [item], True)},
        ]
        chunks = [
            f"event: {event['type']}\n".encode()
            + b"data: "
            + _dumps({**event, "sequence_number": number})
            + b"\n\n"
            for number, event in enumerate(events)
        ]
        return self._stream(chunks)

    # -- embeddings -------------------------------------------------------

    async def _embeddings(self, request: Request) -> Response:
        payload = await request.json()
        model = payload.get("model", "text-embedding-3-small")
        raw = payload.get("input", "")
        inputs: list[Any] = (
            raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        )
        dimensions = int(payload.get("dimensions") or _EMBEDDING_DIMENSIONS.get(model, 1536))
        as_base64 = payload.get("encoding_format") == "base64"
        data = []
        total = 0
        for index, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(str(t) for t in item)
            total += len(item) if isinstance(item, list) else tokens_for(text)
            vector = _vector(text, dimensions)
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
                if as_base64
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": total, "total_tokens": total},
            }
        )

    # -- audio ------------------------------------------------------------

    async def _audio_text(self, request: Request, *, task: str) -> Response:
        # The form's uploads are temporary files: close them when done.
        async with request.form() as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return _error(400, "file is required", type="invalid_request_error")
            audio = await upload.read()
            model = str(form.get("model") or "whisper-1")
            fmt = str(form.get("response_format") or "json")
        seconds = _audio_seconds(audio)
        text = TRANSCRIPT
        if fmt == "text":
            return PlainTextResponse(text + "\n")
        if fmt == "verbose_json":
            return JSONResponse(
                {
                    "task": task,
                    "language": "german",
                    "duration": seconds,
                    "text": text,
                    "segments": [
                        {
                            "id": 0,
                            "seek": 0,
                            "start": 0.0,
                            "end": seconds,
                            "text": text,
                            "tokens": [],
                            "temperature": 0.0,
                            "avg_logprob": -0.1,
                            "compression_ratio": 1.0,
                            "no_speech_prob": 0.0,
                        }
                    ],
                    "usage": {"type": "duration", "seconds": math.ceil(seconds)},
                }
            )
        body: dict[str, Any] = {"text": text}
        if task == "transcribe":
            if model == "whisper-1":
                body["usage"] = {"type": "duration", "seconds": math.ceil(seconds)}
            else:
                prompt = max(1, round(seconds * 10))
                out = tokens_for(text)
                body["usage"] = {
                    "type": "tokens",
                    "input_tokens": prompt,
                    "input_token_details": {"text_tokens": 0, "audio_tokens": prompt},
                    "output_tokens": out,
                    "total_tokens": prompt + out,
                }
        return JSONResponse(body)

    async def _transcriptions(self, request: Request) -> Response:
        return await self._audio_text(request, task="transcribe")

    async def _translations(self, request: Request) -> Response:
        return await self._audio_text(request, task="translate")

    async def _speech(self, request: Request) -> Response:
        payload = await request.json()
        text = str(payload.get("input", ""))
        # An MPEG audio frame header, then filler bytes in proportion to the text.
        audio = b"\xff\xfb\x90\x64" + hashlib.sha256(text.encode()).digest() * (1 + len(text) // 8)
        return Response(audio, media_type="audio/mpeg")

    # -- images, moderations, models ---------------------------------------

    async def _images(self, request: Request) -> Response:
        payload = await request.json()
        count = int(payload.get("n") or 1)
        body: dict[str, Any] = {
            "created": CREATED,
            "data": [{"b64_json": base64.b64encode(_PNG).decode()} for _ in range(count)],
        }
        if payload.get("model") == "gpt-image-1":
            prompt = tokens_for(str(payload.get("prompt", "")))
            out = 272 * count
            body["usage"] = {
                "input_tokens": prompt,
                "input_tokens_details": {"text_tokens": prompt, "image_tokens": 0},
                "output_tokens": out,
                "total_tokens": prompt + out,
            }
        return JSONResponse(body)

    async def _moderations(self, request: Request) -> Response:
        payload = await request.json()
        raw = payload.get("input", "")
        inputs = raw if isinstance(raw, list) else [raw]
        categories = ("harassment", "hate", "self-harm", "sexual", "violence")
        result = {
            "flagged": False,
            "categories": dict.fromkeys(categories, False),
            "category_scores": dict.fromkeys(categories, 0.0001),
        }
        return JSONResponse(
            {
                "id": "modr-fake",
                "model": payload.get("model") or "omni-moderation-latest",
                "results": [result for _ in inputs],
            }
        )

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model(name) for name in MODELS]})

    async def _model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in MODELS:
            return _error(
                404,
                f"The model '{name}' does not exist",
                type="invalid_request_error",
                code="model_not_found",
            )
        return JSONResponse(_model(name))


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": CREATED, "owned_by": "openai"}


def _vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `text`."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    values = [rng.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _audio_seconds(audio: bytes) -> float:
    """The audio's duration: read from its headers, else one second per 16 kB."""
    try:
        import mutagen

        info = mutagen.File(io.BytesIO(audio))
        if info is not None and getattr(info, "info", None) is not None:
            return round(float(info.info.length), 3)
    except Exception:  # any unreadable upload falls back to the size rule
        pass
    return round(len(audio) / 16_000, 3)


class _EventStream(Response):
    """A server-sent event stream that the fake can pace, cut, and see abandoned."""

    def __init__(self, fake: FakeUpstream, chunks: Iterable[bytes]) -> None:
        super().__init__(media_type="text/event-stream")
        self._fake = fake
        self._chunks = list(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fake = self._fake
        fake.open_streams += 1

        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(client_gone())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                    ],
                }
            )
            for index, chunk in enumerate(self._chunks):
                if fake.cut_after_chunks is not None and index >= fake.cut_after_chunks:
                    # Returning without finishing the body makes the server
                    # drop the connection: the client sees a cut stream.
                    fake.streams_cut += 1
                    return
                if index and fake.chunk_delay:
                    await asyncio.wait({watcher}, timeout=fake.chunk_delay)
                if watcher.done():
                    fake.streams_abandoned += 1
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                fake.last_chunk_sent_at = time.monotonic()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            fake.streams_completed += 1
        finally:
            watcher.cancel()
            fake.open_streams -= 1
