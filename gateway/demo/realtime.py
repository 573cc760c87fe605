"""A fake OpenAI Realtime upstream: the `/v1/realtime` WebSocket, turn by turn.

Follows the Realtime API's event reference (the GA event names the SDK's
`client.realtime` uses) closely enough for the official SDK: `session.created`
first, `session.updated` for each `session.update`, input audio buffered and
committed by the client (no voice detection: turns are the client's), one
response per `response.create` streamed as audio and transcript deltas and
closed by `response.done` with usage, and in transcription sessions (or with
input transcription on) a `conversation.item.input_audio_transcription.completed`
with usage for each committed buffer.

With `OpenAI-Beta: realtime=v1` on the upgrade (the SDK's `client.beta.realtime`)
it speaks the beta protocol as OpenAI does: the beta session objects
(`modalities`, `input_audio_format`, `input_audio_transcription`,
`max_response_output_tokens`), `transcription_session.created`/`.update`/
`.updated` in transcription sessions, `conversation.item.created`, and
`response.audio.delta`/`response.audio_transcript.delta`/`response.audio.done`.

Usage is deterministic: user audio is 10 tokens a second, assistant audio 2
tokens a delta, an input image 255 tokens, text about a token per four
characters; a response reads the whole conversation, what earlier responses
already read counting as cached.

Knobs (attributes, read as each response starts): `deltas` (audio deltas a
response sends), `delta_delay` (seconds between them), `hang_before_done`
(never finish a response: no `response.done`, not even when cancelled),
`drop_after_deltas` (drop the connection after that many deltas of a
response, as an upstream that dies), `replay_done` (send each `response.done` and
transcription `…completed` twice, as a replayed event).
Records: `sessions` (ids), `client_events` (types received, in order),
`responses_done`, `cancelled`, `open_sessions`, `last_headers`, `last_query`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.demo.answers import error_body, tokens_for

TRANSCRIPT = "Patient berichtet über leichte Kopfschmerzen seit drei Tagen"
ANSWER = "Verstanden, ich notiere die Angaben."
PCM16_BYTES_PER_SECOND = 48_000
USER_AUDIO_TOKENS_PER_SECOND = 10
AUDIO_TOKENS_PER_DELTA = 2
IMAGE_TOKENS = 255  # an `input_image` part of a conversation item
# 50 ms of 24 kHz 16-bit silence per audio delta.
_DELTA_AUDIO = base64.b64encode(bytes(2_400)).decode()


def _dumps(event: Mapping[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


@dataclass
class _Conversation:
    """What one fake session holds: its settings, input buffer and conversation size."""

    session: dict[str, Any]
    buffer_bytes: int = 0
    text_tokens: int = 0  # text in the conversation so far
    image_tokens: int = 0  # images in the conversation so far
    audio_tokens: int = 0  # audio in the conversation so far
    seen_tokens: int = 0  # what the last response read and wrote (cached for the next)
    items: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    responses: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    previous_item: str | None = None
    current: asyncio.Task[None] | None = None
    beta: bool = False  # the beta protocol (OpenAI-Beta: realtime=v1)
    transcription: bool = False

    def transcription_config(self) -> Any:
        """The session's input transcription settings (None: off), GA or beta shape."""
        if self.beta:
            return self.session.get("input_audio_transcription")
        return self.session.get("audio", {}).get("input", {}).get("transcription")

    def event(self, ga: str) -> str:
        """A server event's name in this session's protocol."""
        return _BETA_NAMES.get(ga, ga) if self.beta else ga


# Server events the beta protocol names otherwise.
_BETA_NAMES = {
    "conversation.item.added": "conversation.item.created",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio.done": "response.audio.done",
}


class FakeRealtime:
    """The fake Realtime WebSocket endpoint, as an ASGI app (websocket scopes)."""

    def __init__(self, *, api_key: str) -> None:
        self.api_key = api_key
        self.deltas = 3
        self.delta_delay = 0.0
        self.hang_before_done = False
        self.drop_after_deltas: int | None = None
        self.replay_done = False
        self.sessions: list[str] = []
        self.client_events: list[str] = []
        self.responses_done = 0
        self.cancelled = 0
        self.open_sessions = 0
        self.last_headers: dict[str, str] = {}
        self.last_query: dict[str, str] = {}
        self._ids = itertools.count(1)

    def _event_id(self) -> str:
        return f"event_{next(self._ids):06d}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        self.last_headers = {k: v for k, v in websocket.headers.items()}
        self.last_query = dict(websocket.query_params)
        if websocket.headers.get("authorization") != f"Bearer {self.api_key}":
            body = error_body(
                "Incorrect API key provided.", type="invalid_request_error", code="invalid_api_key"
            )
            await websocket.send_denial_response(
                Response(_dumps(body), status_code=401, media_type="application/json")
            )
            return
        transcription = websocket.query_params.get("intent") == "transcription"
        model = websocket.query_params.get("model")
        if not transcription and not model:
            body = error_body(
                "Missing required parameter: 'model'.",
                type="invalid_request_error",
                code="missing_model",
            )
            await websocket.send_denial_response(
                Response(_dumps(body), status_code=400, media_type="application/json")
            )
            return
        await websocket.accept()
        session_id = f"sess_fake{len(self.sessions) + 1:04d}"
        self.sessions.append(session_id)
        beta = websocket.headers.get("openai-beta") == "realtime=v1"
        conversation = _Conversation(
            session=self._session(session_id, model, transcription, beta=beta),
            beta=beta,
            transcription=transcription,
        )
        self.open_sessions += 1
        try:
            created = (
                "transcription_session.created" if beta and transcription else "session.created"
            )
            await self._send(websocket, {"type": created, "session": conversation.session})
            await self._serve(websocket, conversation)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.open_sessions -= 1
            if conversation.current is not None:
                conversation.current.cancel()

    @staticmethod
    def _session(
        session_id: str, model: str | None, transcription: bool, *, beta: bool = False
    ) -> dict[str, Any]:
        if beta:
            return _beta_session(session_id, model, transcription)
        audio_input: dict[str, Any] = {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "gpt-4o-transcribe"} if transcription else None,
            "turn_detection": None,
        }
        if transcription:
            return {
                "type": "transcription",
                "object": "realtime.transcription_session",
                "id": session_id,
                "audio": {"input": audio_input},
            }
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": session_id,
            "model": model,
            "output_modalities": ["audio"],
            "instructions": "",
            "max_output_tokens": "inf",
            "audio": {
                "input": audio_input,
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"},
            },
        }

    async def _send(self, websocket: WebSocket, event: dict[str, Any]) -> None:
        await websocket.send_text(_dumps({**event, "event_id": self._event_id()}))

    async def _serve(self, websocket: WebSocket, conversation: _Conversation) -> None:
        while True:
            text = await websocket.receive_text()
            try:
                event = json.loads(text)
            except ValueError:
                await self._error(websocket, "The event is not valid JSON.", None)
                continue
            kind = event.get("type") if isinstance(event, dict) else None
            self.client_events.append(str(kind))
            update_kind = (
                "transcription_session.update"
                if conversation.beta and conversation.transcription
                else "session.update"
            )
            if kind == update_kind:
                update = event.get("session")
                if isinstance(update, dict):
                    _merge(conversation.session, update)
                await self._send(
                    websocket,
                    {
                        "type": update_kind[: -len("update")] + "updated",
                        "session": conversation.session,
                    },
                )
            elif kind == "input_audio_buffer.append":
                try:
                    conversation.buffer_bytes += len(base64.b64decode(event.get("audio", "")))
                except (binascii.Error, TypeError, ValueError):
                    await self._error(websocket, "Invalid base64 audio.", event.get("event_id"))
            elif kind == "input_audio_buffer.clear":
                conversation.buffer_bytes = 0
                await self._send(websocket, {"type": "input_audio_buffer.cleared"})
            elif kind == "input_audio_buffer.commit":
                await self._commit(websocket, conversation, event.get("event_id"))
            elif kind == "conversation.item.create":
                await self._add_text_item(websocket, conversation, event.get("item"))
            elif kind == "response.create":
                if conversation.current is not None and not conversation.current.done():
                    await self._error(
                        websocket,
                        "Conversation already has an active response in progress.",
                        event.get("event_id"),
                        code="conversation_already_has_active_response",
                    )
                    continue
                conversation.current = asyncio.create_task(
                    self._respond(websocket, conversation, event.get("response"))
                )
            elif kind == "response.cancel":
                task = conversation.current
                if task is not None and not task.done():
                    task.cancel()
                    with _suppress_cancel():
                        await task
            else:
                await self._error(websocket, f"Unknown event type {kind!r}.", event.get("event_id"))

    async def _error(
        self, websocket: WebSocket, message: str, event_id: Any, *, code: str | None = None
    ) -> None:
        await self._send(
            websocket,
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "code": code,
                    "message": message,
                    "param": None,
                    "event_id": event_id,
                },
            },
        )

    def _item_id(self, conversation: _Conversation) -> str:
        return f"item_{conversation.session['id'][5:]}_{next(conversation.items):03d}"

    async def _commit(
        self, websocket: WebSocket, conversation: _Conversation, event_id: Any
    ) -> None:
        seconds = conversation.buffer_bytes / PCM16_BYTES_PER_SECOND
        if seconds < 0.1:
            await self._error(
                websocket,
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {seconds * 1000:.2f}ms of audio.",
                event_id,
                code="input_audio_buffer_commit_empty",
            )
            return
        conversation.buffer_bytes = 0
        item_id = self._item_id(conversation)
        previous, conversation.previous_item = conversation.previous_item, item_id
        await self._send(
            websocket,
            {
                "type": "input_audio_buffer.committed",
                "previous_item_id": previous,
                "item_id": item_id,
            },
        )
        audio_tokens = math.ceil(seconds * USER_AUDIO_TOKENS_PER_SECOND)
        conversation.audio_tokens += audio_tokens
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        await self._send(
            websocket,
            {
                "type": conversation.event("conversation.item.added"),
                "previous_item_id": previous,
                "item": item,
            },
        )
        if not conversation.beta:
            await self._send(websocket, {"type": "conversation.item.done", "item": item})
        transcription = conversation.transcription_config()
        if not isinstance(transcription, dict):
            return
        words = TRANSCRIPT.split()[: max(1, min(len(TRANSCRIPT.split()), math.ceil(seconds * 3)))]
        transcript = " ".join(words)
        for word in words:
            await self._send(
                websocket,
                {
                    "type": "conversation.item.input_audio_transcription.delta",
                    "item_id": item_id,
                    "content_index": 0,
                    "delta": word + " ",
                },
            )
        usage: dict[str, Any]
        if transcription.get("model") == "whisper-1":
            usage = {"type": "duration", "seconds": round(seconds, 3)}
        else:
            usage = {
                "type": "tokens",
                "input_tokens": audio_tokens,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
                "output_tokens": tokens_for(transcript),
                "total_tokens": audio_tokens + tokens_for(transcript),
            }
        for _ in range(2 if self.replay_done else 1):
            await self._send(
                websocket,
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item_id,
                    "content_index": 0,
                    "transcript": transcript,
                    "usage": usage,
                },
            )

    async def _add_text_item(
        self, websocket: WebSocket, conversation: _Conversation, item: Any
    ) -> None:
        text = ""
        if isinstance(item, dict):
            for part in item.get("content") or []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    text += part["text"]
                elif isinstance(part, dict) and part.get("type") == "input_image":
                    conversation.image_tokens += IMAGE_TOKENS
        conversation.text_tokens += tokens_for(text) if text else 0
        item_id = self._item_id(conversation)
        added = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        }
        await self._send(
            websocket,
            {
                "type": conversation.event("conversation.item.added"),
                "previous_item_id": conversation.previous_item,
                "item": added,
            },
        )
        if not conversation.beta:
            await self._send(websocket, {"type": "conversation.item.done", "item": added})
        conversation.previous_item = item_id

    async def _respond(
        self, websocket: WebSocket, conversation: _Conversation, options: Any
    ) -> None:
        response_id = f"resp_{conversation.session['id'][5:]}_{next(conversation.responses):03d}"
        item_id = self._item_id(conversation)
        deltas, delay = self.deltas, self.delta_delay
        hang, drop = self.hang_before_done, self.drop_after_deltas
        response: dict[str, Any] = {
            "object": "realtime.response",
            "id": response_id,
            "status": "in_progress",
            "status_details": None,
            "output": [],
            "conversation_id": "conv_" + conversation.session["id"][5:],
            ("modalities" if conversation.beta else "output_modalities"): (
                ["text", "audio"] if conversation.beta else ["audio"]
            ),
            "max_output_tokens": "inf",
            "usage": None,
            "metadata": (options or {}).get("metadata") if isinstance(options, dict) else None,
        }
        await self._send(websocket, {"type": "response.created", "response": dict(response)})
        sent = 0
        status = "completed"
        try:
            await self._send(
                websocket,
                {
                    "type": "response.output_item.added",
                    "response_id": response_id,
                    "output_index": 0,
                    "item": {
                        "id": item_id,
                        "object": "realtime.item",
                        "type": "message",
                        "status": "in_progress",
                        "role": "assistant",
                        "content": [],
                    },
                },
            )
            where = {"response_id": response_id, "item_id": item_id, "output_index": 0}
            await self._send(
                websocket,
                {
                    "type": "response.content_part.added",
                    **where,
                    "content_index": 0,
                    "part": {"type": "audio", "transcript": ""},
                },
            )
            words = ANSWER.split()
            for index in range(deltas):
                if drop is not None and sent >= drop:
                    raise _Drop
                if delay:
                    await asyncio.sleep(delay)
                await self._send(
                    websocket,
                    {
                        "type": conversation.event("response.output_audio.delta"),
                        **where,
                        "content_index": 0,
                        "delta": _DELTA_AUDIO,
                    },
                )
                if index < len(words):
                    await self._send(
                        websocket,
                        {
                            "type": conversation.event("response.output_audio_transcript.delta"),
                            **where,
                            "content_index": 0,
                            "delta": words[index] + " ",
                        },
                    )
                sent += 1
            if drop is not None and sent >= drop:
                raise _Drop
            if hang:
                await asyncio.Event().wait()  # never finishes: no response.done
            await self._send(
                websocket, {"type": conversation.event("response.output_audio.done"), **where}
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            if hang:
                return  # an upstream that never reports the response
            status = "cancelled"
        except _Drop:
            await websocket.close(code=1011, reason="upstream went away")
            return
        # Usage: the whole conversation is read; what the last response saw is cached.
        text_in = conversation.text_tokens + 8
        audio_in = conversation.audio_tokens
        image_in = conversation.image_tokens
        input_tokens = text_in + audio_in + image_in
        cached = min(conversation.seen_tokens, input_tokens)
        cached_audio = min(cached, audio_in)
        cached_image = min(cached - cached_audio, image_in)
        audio_out = AUDIO_TOKENS_PER_DELTA * sent
        text_out = tokens_for(" ".join(words[:sent])) if sent else 0
        output_tokens = audio_out + text_out
        conversation.seen_tokens = input_tokens + output_tokens
        conversation.audio_tokens += audio_out
        conversation.text_tokens += text_out
        conversation.previous_item = item_id
        response.update(
            status=status,
            status_details=(
                {"type": "cancelled", "reason": "client_cancelled"}
                if status == "cancelled"
                else None
            ),
            usage={
                "total_tokens": input_tokens + output_tokens,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "input_token_details": {
                    "text_tokens": text_in,
                    "audio_tokens": audio_in,
                    "image_tokens": image_in,
                    "cached_tokens": cached,
                    "cached_tokens_details": {
                        "text_tokens": cached - cached_audio - cached_image,
                        "audio_tokens": cached_audio,
                        "image_tokens": cached_image,
                    },
                },
                "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
            },
        )
        with _suppress_cancel():
            for _ in range(2 if self.replay_done else 1):
                await self._send(websocket, {"type": "response.done", "response": response})
            self.responses_done += 1


def _beta_session(session_id: str, model: str | None, transcription: bool) -> dict[str, Any]:
    """A session object of the beta protocol, as its `session.created` carries it."""
    if transcription:
        return {
            "id": session_id,
            "object": "realtime.transcription_session",
            "modalities": ["text"],
            "input_audio_format": "pcm16",
            "input_audio_transcription": {
                "model": "gpt-4o-transcribe",
                "language": None,
                "prompt": "",
            },
            "turn_detection": None,
            "input_audio_noise_reduction": None,
            "include": None,
        }
    return {
        "id": session_id,
        "object": "realtime.session",
        "model": model,
        "modalities": ["text", "audio"],
        "instructions": "",
        "voice": "alloy",
        "input_audio_format": "pcm16",
        "output_audio_format": "pcm16",
        "input_audio_transcription": None,
        "turn_detection": None,
        "tools": [],
        "tool_choice": "auto",
        "temperature": 0.8,
        "max_response_output_tokens": "inf",
    }


class _Drop(Exception):
    """The fake upstream drops the connection mid-response."""


class _suppress_cancel:
    """Finish a send even while the task is being cancelled (the session closes)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> bool:
        return kind is not None and issubclass(kind, asyncio.CancelledError)


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    """Merge a `session.update` into the session, object members recursively."""
    for key, value in update.items():
        current = into.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            _merge(current, value)
        else:
            into[key] = value


def client_secret(body: Any) -> dict[str, Any]:
    """`POST /v1/realtime/client_secrets`: an ephemeral key and the session it is for."""
    session = body.get("session") if isinstance(body, dict) else None
    session = dict(session) if isinstance(session, dict) else {"type": "realtime"}
    session.setdefault("model", "gpt-realtime")
    session.setdefault("object", "realtime.session")
    session["id"] = "sess_fake_ephemeral"
    return {"value": "ek_fake_ephemeral_key", "expires_at": 1_700_000_600, "session": session}
