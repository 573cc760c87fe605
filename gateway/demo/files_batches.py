"""The fake upstream's Files, Uploads and Batch APIs, shaped as OpenAI's (openai.types
FileObject, Upload, UploadPart, Batch) and kept in memory.

A batch goes `validating` → `in_progress` (at its first retrieve) and then, at
each retrieve, completes `lines_per_poll` more of its lines (None: all at
once); when all are done it is `completed`, with an output file whose lines
carry each answer and its `usage`. Cancel makes it `cancelling`, and the next
retrieve `cancelled`, with an output file of the lines completed so far.
Tests steer it through `lines_per_poll`, `advance()`, `fail_lines`
(custom_ids the endpoint answers with a 400, in the error file), `expire()` (the window ran
out: done lines in the output file, the rest `batch_expired` error lines)
and `fail()` (refused by the upstream's validation: `errors`, no files). A batch keeps the
`metadata` it was created with, as OpenAI's do. `create_gate` (an
`asyncio.Event`) holds the answer to `POST /v1/batches` back until it is
set, after the batch was made, or, with `create_lost`, before: then no
batch is made and the answer is a 500 (a crash of the upstream's own);
`refuse_creates` answers every create with a 400.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.demo import answers, media

_ANSWERS: Mapping[str, Callable[[Any], Any]] = {
    "/v1/chat/completions": answers.chat_completion,
    "/v1/completions": answers.completion,
    "/v1/responses": answers.response,
    "/v1/embeddings": media.embeddings,
    "/v1/moderations": media.moderations,
}
_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# The purposes OpenAI takes for a file or an upload (openai.types.FilePurpose).
PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})


def _not_found(kind: str, object_id: str) -> Response:
    body = {
        "error": {
            "message": f"No such {kind}: {object_id}",
            "type": "invalid_request_error",
            "param": "id",
            "code": None,
        }
    }
    return JSONResponse(body, status_code=404)


def _bad(message: str, param: str | None = None) -> Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    }
    return JSONResponse(body, status_code=400)


def _page(
    items: list[dict[str, Any]], request: Request, *, default: int, most: int
) -> dict[str, Any] | Response:
    """A cursor page as OpenAI lists: newest first, `after` an id, `limit` items (from 1 to
    `most`, else a 400 as OpenAI's)."""
    after = request.query_params.get("after")
    limit = int(request.query_params.get("limit", str(default)))
    if not 1 <= limit <= most:
        return _bad(f"limit must be between 1 and {most}", "limit")
    ordered = sorted(items, key=lambda item: (item["created_at"], item["id"]), reverse=True)
    if request.query_params.get("order") == "asc":
        ordered.reverse()
    if after:
        ids = [item["id"] for item in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }


class FakeFilesBatches:
    """The Files, Uploads and Batch endpoints of the fake upstream (see the module doc)."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.uploads: dict[str, dict[str, Any]] = {}
        self.parts: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.done_lines: dict[str, list[bytes]] = {}
        self.lines_per_poll: int | None = None
        self.fail_lines: set[str] = set()
        self.retrieves = 0
        # (host, port) of the connection each retrieve came over: which process polled.
        self.retrieve_peers: list[tuple[str, int]] = []
        self.create_gate: asyncio.Event | None = None
        self.create_lost = False
        self.refuse_creates = False
        self.creates_received = 0
        self.lists = 0
        self._ids = itertools.count(1)
        self._clock = itertools.count(int(time.time()))

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):08d}{time.time_ns() % 1_000_000:06d}"

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self._create_file, methods=["POST"]),
            Route("/v1/files", self._list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", self._get_file, methods=["GET"]),
            Route("/v1/files/{file_id}", self._delete_file, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self._file_content, methods=["GET"]),
            Route("/v1/uploads", self._create_upload, methods=["POST"]),
            Route("/v1/uploads/{upload_id}/parts", self._add_part, methods=["POST"]),
            Route("/v1/uploads/{upload_id}/complete", self._complete_upload, methods=["POST"]),
            Route("/v1/uploads/{upload_id}/cancel", self._cancel_upload, methods=["POST"]),
            Route("/v1/batches", self._create_batch, methods=["POST"]),
            Route("/v1/batches", self._list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self._get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self._cancel_batch, methods=["POST"]),
        ]

    # -- files --------------------------------------------------------------

    def add_file(self, data: bytes, *, filename: str, purpose: str) -> dict[str, Any]:
        file_id = self._id("file-")
        entry = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": next(self._clock),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self.files[file_id] = entry
        self.contents[file_id] = data
        return entry

    async def _create_file(self, request: Request) -> Response:
        async with request.form(max_part_size=1024 * 1024 * 1024) as form:
            upload = form.get("file")
            purpose = form.get("purpose")
            if not isinstance(upload, UploadFile) or not isinstance(purpose, str):
                return _bad("file and purpose are required")
            if purpose not in PURPOSES:
                return _bad(f"Invalid purpose: {purpose}", "purpose")
            data = await upload.read()
            entry = self.add_file(data, filename=upload.filename or "", purpose=purpose)
            return JSONResponse(entry)

    async def _list_files(self, request: Request) -> Response:
        purpose = request.query_params.get("purpose")
        items = [f for f in self.files.values() if purpose is None or f["purpose"] == purpose]
        page = _page(items, request, default=10_000, most=10_000)
        return page if isinstance(page, Response) else JSONResponse(page)

    async def _get_file(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        entry = self.files.get(file_id)
        return JSONResponse(entry) if entry else _not_found("File", file_id)

    async def _delete_file(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if self.files.pop(file_id, None) is None:
            return _not_found("File", file_id)
        self.contents.pop(file_id, None)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    async def _file_content(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if file_id not in self.contents:
            return _not_found("File", file_id)
        data = self.contents[file_id]
        if "gzip" in request.headers.get("accept-encoding", ""):
            # Compressed whenever the caller accepts it, as web servers do.
            return Response(
                gzip.compress(data, compresslevel=1),
                media_type="application/octet-stream",
                headers={"content-encoding": "gzip"},
            )
        return Response(data, media_type="application/octet-stream")

    # -- uploads ------------------------------------------------------------

    async def _create_upload(self, request: Request) -> Response:
        body = await request.json()
        if body.get("purpose") not in PURPOSES:
            return _bad(f"Invalid purpose: {body.get('purpose')}", "purpose")
        upload_id = self._id("upload_")
        now = next(self._clock)
        self.uploads[upload_id] = {
            "id": upload_id,
            "object": "upload",
            "bytes": int(body["bytes"]),
            "created_at": now,
            "expires_at": now + 3600,
            "filename": body["filename"],
            "purpose": body["purpose"],
            "status": "pending",
            "file": None,
            "_parts": [],
        }
        return JSONResponse(self._upload(upload_id))

    def _upload(self, upload_id: str) -> dict[str, Any]:
        return {k: v for k, v in self.uploads[upload_id].items() if not k.startswith("_")}

    async def _add_part(self, request: Request) -> Response:
        upload_id = request.path_params["upload_id"]
        if upload_id not in self.uploads:
            return _not_found("Upload", upload_id)
        async with request.form(max_part_size=128 * 1024 * 1024) as form:
            data = form.get("data")
            if not isinstance(data, UploadFile):
                return _bad("data is required", "data")
            part_id = self._id("part_")
            self.parts[part_id] = await data.read()
        self.uploads[upload_id]["_parts"].append(part_id)
        return JSONResponse(
            {
                "id": part_id,
                "object": "upload.part",
                "created_at": next(self._clock),
                "upload_id": upload_id,
            }
        )

    async def _complete_upload(self, request: Request) -> Response:
        upload_id = request.path_params["upload_id"]
        upload = self.uploads.get(upload_id)
        if upload is None:
            return _not_found("Upload", upload_id)
        part_ids = (await request.json()).get("part_ids", [])
        data = b"".join(self.parts[part] for part in part_ids)
        if len(data) != upload["bytes"]:
            return _bad("The upload's bytes do not match the parts' size", "bytes")
        upload["status"] = "completed"
        upload["file"] = self.add_file(data, filename=upload["filename"], purpose=upload["purpose"])
        return JSONResponse(self._upload(upload_id))

    async def _cancel_upload(self, request: Request) -> Response:
        upload_id = request.path_params["upload_id"]
        if upload_id not in self.uploads:
            return _not_found("Upload", upload_id)
        self.uploads[upload_id]["status"] = "cancelled"
        return JSONResponse(self._upload(upload_id))

    # -- batches ------------------------------------------------------------

    async def _create_batch(self, request: Request) -> Response:
        body = await request.json()
        self.creates_received += 1
        if self.refuse_creates:
            return _bad("This batch cannot be created now.", "input_file_id")
        if self.create_lost:
            if self.create_gate is not None:
                await self.create_gate.wait()
            body = {"error": {"message": "The server had an error.", "type": "server_error"}}
            return JSONResponse(body, status_code=500)
        file_id = body.get("input_file_id")
        if file_id not in self.contents:
            return _not_found("File", str(file_id))
        endpoint = body.get("endpoint")
        if endpoint not in _ANSWERS:
            return _bad(f"Invalid endpoint: {endpoint}", "endpoint")
        batch_id = self._id("batch_")
        now = next(self._clock)
        lines = [line for line in self.contents[file_id].splitlines() if line.strip()]
        self.batches[batch_id] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86_400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        self.done_lines[batch_id] = []
        if self.create_gate is not None:
            await self.create_gate.wait()
        return JSONResponse(self.batches[batch_id])

    @staticmethod
    def _ok(line: bytes) -> bool:
        """An output line (its answer a 200), else an error file's line."""
        response = json.loads(line).get("response")
        return isinstance(response, dict) and response.get("status_code") == 200

    def _count(self, batch: dict[str, Any]) -> None:
        done = self.done_lines[batch["id"]]
        counts = batch["request_counts"]
        counts["completed"] = sum(1 for line in done if self._ok(line))
        counts["failed"] = len(done) - counts["completed"]

    def advance(self, batch_id: str, lines: int) -> None:
        """Complete the next `lines` lines of a running batch."""
        batch = self.batches[batch_id]
        pending = [
            line for line in self.contents[batch["input_file_id"]].splitlines() if line.strip()
        ]
        done = self.done_lines[batch_id]
        for raw in pending[len(done) : len(done) + lines]:
            done.append(self._answer_line(batch["endpoint"], raw))
        self._count(batch)

    def _answer_line(self, endpoint: str, raw: bytes) -> bytes:
        request = json.loads(raw)
        custom_id = request["custom_id"]
        if custom_id in self.fail_lines:
            # As OpenAI writes a request the endpoint refused: its HTTP answer, `error` null.
            line: dict[str, Any] = {
                "id": self._id("batch_req_"),
                "custom_id": custom_id,
                "response": {
                    "status_code": 400,
                    "request_id": self._id("req_"),
                    "body": {
                        "error": {
                            "message": "The line failed.",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": None,
                        }
                    },
                },
                "error": None,
            }
        else:
            line = {
                "id": self._id("batch_req_"),
                "custom_id": custom_id,
                "response": {
                    "status_code": 200,
                    "request_id": self._id("req_"),
                    "body": _ANSWERS[endpoint](request["body"]),
                },
                "error": None,
            }
        return json.dumps(line, separators=(",", ":")).encode()

    def _finish(self, batch: dict[str, Any], status: str) -> None:
        done = self.done_lines[batch["id"]]
        ok = [line for line in done if self._ok(line)]
        failed = [line for line in done if not self._ok(line)]
        now = next(self._clock)
        if ok:
            batch["output_file_id"] = self.add_file(
                b"\n".join(ok) + b"\n", filename="batch_output.jsonl", purpose="batch_output"
            )["id"]
        if failed:
            batch["error_file_id"] = self.add_file(
                b"\n".join(failed) + b"\n", filename="batch_errors.jsonl", purpose="batch_output"
            )["id"]
        batch["status"] = status
        batch["finalizing_at"] = batch["finalizing_at"] or now
        batch[f"{status}_at"] = now

    def expire(self, batch_id: str) -> None:
        """The completion window runs out (as OpenAI's does): the lines done so far are in
        the output file, each unfinished one is an error line `batch_expired`."""
        batch = self.batches[batch_id]
        pending = [
            line for line in self.contents[batch["input_file_id"]].splitlines() if line.strip()
        ]
        done = self.done_lines[batch_id]
        for raw in pending[len(done) :]:
            line = {
                "id": self._id("batch_req_"),
                "custom_id": json.loads(raw)["custom_id"],
                "response": None,
                "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion "
                    "window expired.",
                },
            }
            done.append(json.dumps(line, separators=(",", ":")).encode())
        self._count(batch)
        self._finish(batch, "expired")

    def fail(self, batch_id: str, message: str = "The input file is not valid.") -> None:
        """The upstream's own validation refuses the batch: `failed`, `errors` set, no lines
        run and no output or error file, as OpenAI's failed batches are."""
        batch = self.batches[batch_id]
        now = next(self._clock)
        batch["status"] = "failed"
        batch["failed_at"] = now
        batch["errors"] = {
            "object": "list",
            "data": [{"code": "invalid_request", "message": message, "param": None, "line": 1}],
        }
        batch["request_counts"] = {"total": 0, "completed": 0, "failed": 0}

    def step(self, batch_id: str) -> None:
        """What one retrieve does to a batch (see the module doc)."""
        batch = self.batches[batch_id]
        status = batch["status"]
        if status == "validating":
            batch["status"] = "in_progress"
            batch["in_progress_at"] = next(self._clock)
        elif status == "in_progress":
            total = batch["request_counts"]["total"]
            step = total if self.lines_per_poll is None else self.lines_per_poll
            self.advance(batch_id, step)
            if len(self.done_lines[batch_id]) >= total:
                self._finish(batch, "completed")
        elif status == "cancelling":
            self._finish(batch, "cancelled")

    async def _get_batch(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        if batch_id not in self.batches:
            return _not_found("Batch", batch_id)
        self.retrieves += 1
        if request.client is not None:
            self.retrieve_peers.append((request.client.host, request.client.port))
        self.step(batch_id)
        return JSONResponse(self.batches[batch_id])

    async def _list_batches(self, request: Request) -> Response:
        self.lists += 1
        page = _page(list(self.batches.values()), request, default=20, most=100)
        return page if isinstance(page, Response) else JSONResponse(page)

    async def _cancel_batch(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        batch = self.batches.get(batch_id)
        if batch is None:
            return _not_found("Batch", batch_id)
        if batch["status"] not in _TERMINAL:
            batch["status"] = "cancelling"
            batch["cancelling_at"] = next(self._clock)
        return JSONResponse(batch)
