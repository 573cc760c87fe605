"""A fake Azure OpenAI resource: deployment paths, `api-version`, the `api-key` header.

It answers as Azure OpenAI does where Azure differs from OpenAI:

- `POST /openai/deployments/{deployment}/{operation}?api-version=...` for chat
  and legacy completions, embeddings, audio and images; the deployment, not
  the body's `model`, decides the model. `POST /openai/responses?api-version=`
  and Azure's v1 scheme (`/openai/v1/...`, no api-version needed) name the
  deployment in the body's `model`. `GET /openai/models?api-version=`.
- the key in the `api-key` header (401 otherwise, in Azure's shape);
- Azure's error shapes: `{"error": {"code": "DeploymentNotFound", ...}}`,
  "Unrecognized request argument supplied: store" on chat completions of an
  api-version before `STORE_SINCE_API_VERSION`,
  `{"error": {"code": "404", "message": "Resource not found"}}` without an
  api-version, and the content filter's 400 (`code: content_filter` with
  `innererror.content_filter_result`) for a prompt holding `FILTERED_WORD`;
- content filter results in answers: `prompt_filter_results` and each
  choice's `content_filter_results`, and in a stream a first chunk with no
  choices that carries the prompt's results, as Azure sends it.

The answers themselves (text, usage) are the demo upstream's (`answers`,
`media`). Knobs and records as `FakeUpstream`: `errors` (a queue of
`(status, body)`), `chunk_delay`, `cut_after_chunks`; `requests`, `paths`
(path and query), `bodies`, `last_headers`, `last_body`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from gateway.demo import answers, audio, media
from gateway.demo.answers import Answer, Streamed
from gateway.demo.sse import EventStream, dumps, sse_data

FAKE_AZURE_KEY = "fake-azure-api-key-0123456789abcdef"
# A prompt holding this word is refused by the fake content filter.
FILTERED_WORD = "FILTER-ME"
# Chat completions accept `store` (stored completions) from this API version on;
# before it Azure refuses the unknown argument.
STORE_SINCE_API_VERSION = "2025-01-01-preview"

_SAFE = {"filtered": False, "severity": "safe"}
_FILTER_RESULTS: dict[str, Any] = {
    "hate": _SAFE,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
_PROMPT_FILTER_RESULTS: dict[str, Any] = {
    **_FILTER_RESULTS,
    "jailbreak": {"filtered": False, "detected": False},
}
_DEPLOYMENT_OPERATIONS = (
    "chat/completions",
    "completions",
    "embeddings",
    "audio/transcriptions",
    "audio/translations",
    "audio/speech",
    "images/generations",
)


def _azure_error(status: int, code: str, message: str, **extra: Any) -> Response:
    return Response(
        dumps({"error": {"code": code, "message": message, **extra}}),
        status_code=status,
        media_type="application/json",
    )


def _content_filter_error() -> Response:
    return Response(
        dumps(
            {
                "error": {
                    "message": "The response was filtered due to the prompt triggering Azure "
                    "OpenAI's content management policy. Please modify your prompt and retry.",
                    "type": None,
                    "param": "prompt",
                    "code": "content_filter",
                    "status": 400,
                    "innererror": {
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": {
                            **_PROMPT_FILTER_RESULTS,
                            "violence": {"filtered": True, "severity": "medium"},
                        },
                    },
                }
            }
        ),
        status_code=400,
        media_type="application/json",
    )


class FakeAzureOpenAI:
    """One fake Azure OpenAI resource as an ASGI app; `deployments` maps deployment → model."""

    def __init__(self, *, deployments: Mapping[str, str], api_key: str = FAKE_AZURE_KEY) -> None:
        self.api_key = api_key
        self.deployments = dict(deployments)
        self.errors: list[tuple[int, Any]] = []
        self.chunk_delay = 0.0
        self.cut_after_chunks: int | None = None
        self.requests = 0
        self.paths: list[str] = []
        self.bodies: list[bytes] = []
        self.last_headers: dict[str, str] = {}
        self.last_body = b""
        self.open_streams = 0
        self.streams_completed = 0
        self.streams_abandoned = 0
        self.streams_cut = 0
        self.last_chunk_sent_at = 0.0

    @property
    def last_json(self) -> Any:
        return json.loads(self.last_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
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
        query = scope.get("query_string", b"").decode("latin-1")
        self.requests += 1
        self.paths.append(scope["path"] + ("?" + query if query else ""))
        self.bodies.append(body)
        self.last_body = body
        self.last_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        async def replay() -> Any:
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(scope, replay)
        response = await self._answer(request, scope["path"], parse_qs(query), body)
        await response(scope, receive, send)

    async def _answer(
        self, request: Request, path: str, query: dict[str, list[str]], body: bytes
    ) -> Response:
        if self.last_headers.get("api-key") != self.api_key:
            return _azure_error(
                401,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                "to provide a valid key for an active subscription and use a correct regional "
                "API endpoint for your resource.",
            )
        if self.errors:
            status, payload = self.errors.pop(0)
            return Response(dumps(payload), status_code=status, media_type="application/json")
        v1 = path.startswith("/openai/v1/")
        deployment: str | None = None
        if not v1 and not query.get("api-version"):
            return _azure_error(404, "404", "Resource not found")
        if v1:
            operation = path[len("/openai/v1/") :]
        elif path.startswith("/openai/deployments/"):
            deployment, _, operation = path[len("/openai/deployments/") :].partition("/")
            if operation not in _DEPLOYMENT_OPERATIONS:
                return _azure_error(404, "404", "Resource not found")
            if deployment not in self.deployments:
                return _deployment_not_found()
        elif path.startswith("/openai/"):
            operation = path[len("/openai/") :]
        else:
            return _azure_error(404, "404", "Resource not found")
        if operation == "models" and request.method == "GET":
            return JSONResponse(
                {"object": "list", "data": [media.model(m) for m in self.deployments.values()]}
            )
        if operation.startswith("audio/transcriptions") or operation.startswith(
            "audio/translations"
        ):
            return await self._audio(request, operation, deployment)
        if operation not in (*_DEPLOYMENT_OPERATIONS, "responses"):
            return _azure_error(404, "404", "Resource not found")
        payload = json.loads(body)
        if deployment is None:
            # Responses and the v1 scheme: the body's model names the deployment.
            deployment = payload.get("model")
            if deployment not in self.deployments:
                return _deployment_not_found()
        payload["model"] = self.deployments[deployment]
        if FILTERED_WORD in body.decode("utf-8", "replace"):
            return _content_filter_error()
        if operation == "chat/completions":
            version = (query.get("api-version") or [""])[0]
            if "store" in payload and not v1 and version < STORE_SINCE_API_VERSION:
                return Response(
                    dumps(
                        {
                            "error": {
                                "message": "Unrecognized request argument supplied: store",
                                "type": "invalid_request_error",
                                "param": None,
                                "code": None,
                            }
                        }
                    ),
                    status_code=400,
                    media_type="application/json",
                )
            return self._respond(_filtered(answers.chat_completion(payload)))
        if operation == "completions":
            return self._respond(answers.completion(payload))
        if operation == "responses":
            return self._respond(answers.response(payload))
        if operation == "embeddings":
            return JSONResponse(media.embeddings(payload))
        if operation == "audio/speech":
            return Response(media.speech(payload), media_type="audio/mpeg")
        return JSONResponse(media.images(payload))

    async def _audio(self, request: Request, operation: str, deployment: str | None) -> Response:
        async with request.form() as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return _azure_error(400, "invalid_request", "file is required")
            data = await upload.read()
            fmt = str(form.get("response_format") or "json")
            named = str(form.get("model") or "")
            prompt = str(form.get("prompt") or "")
            stream = str(form.get("stream") or "false").lower() == "true"
        if deployment is None:
            if named not in self.deployments:
                return _deployment_not_found()
            deployment = named
        task = "translate" if operation.startswith("audio/translations") else "transcribe"
        result = audio.answer(
            data,
            model=self.deployments[deployment],
            response_format=fmt,
            task=task,
            prompt=prompt,
            stream=stream,
        )
        if isinstance(result, audio.Refused):
            return _azure_error(result.status, "invalid_request", "Invalid audio file")
        if isinstance(result, audio.PlainText):
            return Response(result.body, media_type=result.media_type)
        return self._respond(result)

    def _respond(self, answer: Answer) -> Response:
        if isinstance(answer, Streamed):
            return EventStream(self, answer.chunks)
        return JSONResponse(answer)


def _deployment_not_found() -> Response:
    return _azure_error(
        404,
        "DeploymentNotFound",
        "The API deployment for this resource does not exist. If you created the deployment "
        "within the last 5 minutes, please wait a moment and try again.",
    )


def _filtered(answer: Answer) -> Answer:
    """A chat answer with Azure's content filter results, streamed or whole."""
    prompt_results = [{"prompt_index": 0, "content_filter_results": _PROMPT_FILTER_RESULTS}]
    if not isinstance(answer, Streamed):
        for choice in answer.get("choices", []):
            choice["content_filter_results"] = _FILTER_RESULTS
        return {**answer, "prompt_filter_results": prompt_results}
    first = sse_data(
        {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": prompt_results,
        }
    )
    chunks = [first]
    for frame in answer.chunks:
        if frame.startswith(b"data: {"):
            data = json.loads(frame[len(b"data: ") :])
            for choice in data.get("choices", []):
                choice["content_filter_results"] = (
                    _FILTER_RESULTS if choice.get("delta", {}).get("content") else {}
                )
            frame = sse_data(data)
        chunks.append(frame)
    return Streamed(chunks)
