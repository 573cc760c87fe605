"""A fake OpenAI upstream: deterministic answers with realistic usage.

Shipped for demo mode (`aza-gateway demo`) and used by the tests as the
upstream the gateway forwards to, over real HTTP. This module is the ASGI
app: its routes, its API-key check, the knobs tests steer and the records
they read. What it answers lives in `answers` (text) and `media` (the rest);
streams go out through `sse.EventStream`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send

from gateway.demo import answers, audio, images, media, realtime
from gateway.demo.answers import Answer, Streamed, error_body
from gateway.demo.files_batches import FakeFilesBatches
from gateway.demo.realtime import FakeRealtime
from gateway.demo.sse import EventStream, dumps

FAKE_UPSTREAM_KEY = "sk-fake-upstream-key"


def _error(status: int, body: Any) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json")


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
        # Stored responses by id (store or background), and for a background
        # one the polls it still answers "in_progress" to before it completes.
        self.stored_responses: dict[str, dict[str, Any]] = {}
        self.background_polls: dict[str, int] = {}
        self.background_polls_until_done = 1
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
        # Files, uploads and batches (gateway/demo/files_batches.py).
        self.files_batches = FakeFilesBatches()
        # The Realtime WebSocket (`/v1/realtime`), with knobs and records of its own.
        self.realtime = FakeRealtime(api_key=api_key)
        self._router = Starlette(
            routes=[
                *self.files_batches.routes(),
                WebSocketRoute("/v1/realtime", self.realtime),
                self._json_route("/v1/realtime/client_secrets", realtime.client_secret),
                self._json_route(
                    "/v1/chat/completions",
                    lambda body: answers.chat_completion(
                        body, cached_tokens=self.cached_tokens, omit_usage=self.omit_usage
                    ),
                ),
                self._json_route("/v1/completions", answers.completion),
                self._json_route("/v1/responses", self._create_response),
                Route("/v1/responses/{response_id}", self._get_response, methods=["GET"]),
                Route("/v1/responses/{response_id}", self._delete_response, methods=["DELETE"]),
                Route(
                    "/v1/responses/{response_id}/cancel",
                    self._cancel_response,
                    methods=["POST"],
                ),
                Route(
                    "/v1/responses/{response_id}/input_items",
                    self._response_input_items,
                    methods=["GET"],
                ),
                self._json_route("/v1/embeddings", media.embeddings),
                Route("/v1/audio/transcriptions", self._transcriptions, methods=["POST"]),
                Route("/v1/audio/translations", self._translations, methods=["POST"]),
                Route("/v1/audio/speech", self._speech, methods=["POST"]),
                self._json_route(
                    "/v1/images/generations",
                    lambda body: images.answer(body, kind="generation"),
                ),
                Route("/v1/images/edits", self._image_upload, methods=["POST"]),
                Route("/v1/images/variations", self._image_upload, methods=["POST"]),
                self._json_route("/v1/moderations", media.moderations),
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
                error_body(
                    "Incorrect API key provided.",
                    type="invalid_request_error",
                    code="invalid_api_key",
                ),
            )
        elif self.errors:
            status, payload = self.errors.pop(0)
            response = _error(status, payload)
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

    # -- routes -------------------------------------------------------------

    def respond(self, answer: Answer) -> Response:
        """`answer` as a response: JSON, or an event stream this fake can steer."""
        if isinstance(answer, Streamed):
            return EventStream(self, answer.chunks)
        return JSONResponse(answer)

    def _json_route(self, path: str, answer: Callable[[Any], Answer]) -> Route:
        """A POST route whose JSON body `answer` turns into the answer."""

        async def endpoint(request: Request) -> Response:
            return self.respond(answer(await request.json()))

        return Route(path, endpoint, methods=["POST"])

    async def _audio_text(self, request: Request, *, task: str) -> Response:
        # The form's uploads are temporary files: close them when done.
        async with request.form() as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return _error(400, error_body("file is required", type="invalid_request_error"))
            data = await upload.read()
            got = audio.answer(
                data,
                model=str(form.get("model") or "whisper-1"),
                response_format=str(form.get("response_format") or "json"),
                task=task,
                prompt=str(form.get("prompt") or ""),
                stream=str(form.get("stream") or "false").lower() == "true",
            )
        if isinstance(got, audio.Refused):
            return _error(got.status, got.body)
        if isinstance(got, audio.PlainText):
            return Response(got.body, media_type=got.media_type)
        return self.respond(got)

    async def _image_upload(self, request: Request) -> Response:
        """`POST /v1/images/edits` and `/v1/images/variations` (multipart)."""
        kind = "edit" if request.url.path.endswith("/edits") else "variation"
        async with request.form() as form:
            uploads = [
                value
                for key, value in form.multi_items()
                if key in ("image", "image[]") and isinstance(value, UploadFile)
            ]
            if not uploads:
                return _error(400, error_body("image is required", type="invalid_request_error"))
            fields = {key: value for key, value in form.items() if isinstance(value, str)}
        return self.respond(images.answer(fields, kind=kind, input_images=len(uploads)))

    # -- stored and background responses --------------------------------------

    def _create_response(self, body: Any) -> Answer:
        answer = answers.response(body, cached_tokens=self.cached_tokens)
        if isinstance(answer, dict) and (body.get("store") or body.get("background")):
            self.stored_responses[answer["id"]] = answer
            if body.get("background"):
                self.background_polls[answer["id"]] = self.background_polls_until_done
                return {
                    **answer,
                    "status": "queued",
                    "output": [],
                    "usage": None,
                    "background": True,
                }
        return answer

    def _stored(self, request: Request) -> dict[str, Any] | None:
        return self.stored_responses.get(request.path_params["response_id"])

    @staticmethod
    def _no_response(request: Request) -> Response:
        ident = request.path_params["response_id"]
        return _error(
            404,
            error_body(f"Response with id '{ident}' not found.", type="invalid_request_error"),
        )

    async def _get_response(self, request: Request) -> Response:
        stored = self._stored(request)
        if stored is None:
            return self._no_response(request)
        ident = stored["id"]
        if self.background_polls.get(ident, 0) > 0:
            self.background_polls[ident] -= 1
            return JSONResponse(
                {**stored, "status": "in_progress", "output": [], "usage": None, "background": True}
            )
        return JSONResponse(stored)

    async def _cancel_response(self, request: Request) -> Response:
        stored = self._stored(request)
        if stored is None:
            return self._no_response(request)
        if self.background_polls.get(stored["id"], 0) <= 0:
            return JSONResponse(stored)  # finished already: cancel changes nothing
        self.background_polls[stored["id"]] = 0
        cancelled = {**stored, "status": "cancelled", "background": True}
        self.stored_responses[stored["id"]] = cancelled
        return JSONResponse(cancelled)

    async def _delete_response(self, request: Request) -> Response:
        stored = self.stored_responses.pop(request.path_params["response_id"], None)
        if stored is None:
            return self._no_response(request)
        return JSONResponse({"id": stored["id"], "object": "response", "deleted": True})

    async def _response_input_items(self, request: Request) -> Response:
        stored = self._stored(request)
        if stored is None:
            return self._no_response(request)
        return JSONResponse(
            {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
        )

    async def _transcriptions(self, request: Request) -> Response:
        return await self._audio_text(request, task="transcribe")

    async def _translations(self, request: Request) -> Response:
        return await self._audio_text(request, task="translate")

    async def _speech(self, request: Request) -> Response:
        payload = await request.json()
        if payload.get("stream_format") == "sse":
            return self.respond(Streamed(media.speech_events(payload)))
        return Response(media.speech(payload), media_type="audio/mpeg")

    async def _models(self, request: Request) -> Response:
        return JSONResponse(media.models())

    async def _model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in media.MODELS:
            return _error(404, media.model_not_found(name))
        return JSONResponse(media.model(name))
