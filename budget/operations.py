"""The OpenAI API endpoints the gateway forwards, and how each is metered: one table.

`ENDPOINTS` is the single list of method + path template → operation. The
proxy's allow-list, the app's routes and the metering middleware's dispatch
are all derived from it; add an endpoint here and nowhere else.

A template's `{name}` stands for exactly one non-empty path segment.
Matching is by the path as the server decoded it; rejecting dot segments and
encoded slashes before matching is the proxy's business (issue 12).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType


class Operation(StrEnum):
    """The kind of upstream call, which decides how it is read and priced."""

    CHAT = "chat"
    COMPLETION = "completion"
    RESPONSES = "responses"
    EMBEDDING = "embedding"
    TRANSCRIPTION = "transcription"
    TRANSLATION = "translation"
    SPEECH = "speech"
    IMAGE = "image"
    IMAGE_EDIT = "image_edit"
    IMAGE_VARIATION = "image_variation"
    MODERATION = "moderation"
    # Forwarded for an authenticated caller, never billed.
    MODELS = "models"
    # A stored response, forwarded only for the practice that created it
    # (a background response is settled when it is seen finished).
    RESPONSE_OBJECT = "response_object"
    # Content kept upstream (stored chat completions): forwarded, never billed,
    # and only where storage is allowed (zero retention refuses it otherwise).
    STORED_CONTENT = "stored_content"
    # Files, uploads and batches: answered by the gateway's own handlers
    # (gateway/files.py, gateway/batches.py), which keep who owns each id;
    # files cost nothing, a batch is held and charged as a whole.
    FILES = "files"
    BATCHES = "batches"
    # A Realtime session's response, and the transcription of a committed
    # input buffer in a Realtime session (gateway/realtime.py: a WebSocket,
    # not a row of ENDPOINTS).
    REALTIME = "realtime"
    REALTIME_TRANSCRIPTION = "realtime_transcription"


# Operations that are forwarded without a hold or a usage event.
UNMETERED = frozenset(
    {
        Operation.MODELS,
        Operation.STORED_CONTENT,
        Operation.FILES,
        Operation.BATCHES,
        Operation.RESPONSE_OBJECT,
    }
)
# Operations the gateway answers itself (after authenticating), not the plain proxy.
OWN_HANDLERS = frozenset({Operation.FILES, Operation.BATCHES})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One forwarded OpenAI API endpoint: `method` on `template` is an `operation`."""

    method: str
    template: str
    operation: Operation
    # The template's segments; a segment in braces matches any one segment.
    _segments: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_segments", tuple(self.template.split("/")))

    @property
    def metered(self) -> bool:
        """True when the call is gated (hold) and settled (usage event)."""
        return self.operation not in UNMETERED

    @property
    def is_static(self) -> bool:
        """True when the template has no `{parameter}`."""
        return "{" not in self.template

    def match(self, path: str) -> dict[str, str] | None:
        """The template's parameters when `path` matches it, else None."""
        parts = path.split("/")
        if len(parts) != len(self._segments):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self._segments, parts, strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


# Not rows here: the Realtime WebSocket (`/v1/realtime`) and its ephemeral-key
# routes (`/v1/realtime/client_secrets`, `/sessions`), which the gateway
# answers itself (gateway/realtime.py) instead of forwarding over HTTP.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("POST", "/v1/chat/completions", Operation.CHAT),
    Endpoint("POST", "/v1/completions", Operation.COMPLETION),
    Endpoint("POST", "/v1/responses", Operation.RESPONSES),
    Endpoint("POST", "/v1/embeddings", Operation.EMBEDDING),
    Endpoint("POST", "/v1/audio/transcriptions", Operation.TRANSCRIPTION),
    Endpoint("POST", "/v1/audio/translations", Operation.TRANSLATION),
    Endpoint("POST", "/v1/audio/speech", Operation.SPEECH),
    Endpoint("POST", "/v1/images/generations", Operation.IMAGE),
    Endpoint("POST", "/v1/images/edits", Operation.IMAGE_EDIT),
    Endpoint("POST", "/v1/images/variations", Operation.IMAGE_VARIATION),
    Endpoint("POST", "/v1/moderations", Operation.MODERATION),
    Endpoint("GET", "/v1/responses/{response_id}", Operation.RESPONSE_OBJECT),
    Endpoint("DELETE", "/v1/responses/{response_id}", Operation.RESPONSE_OBJECT),
    Endpoint("POST", "/v1/responses/{response_id}/cancel", Operation.RESPONSE_OBJECT),
    Endpoint("GET", "/v1/responses/{response_id}/input_items", Operation.RESPONSE_OBJECT),
    Endpoint("GET", "/v1/models", Operation.MODELS),
    Endpoint("GET", "/v1/models/{model}", Operation.MODELS),
    # Stored chat completions (OpenAI keeps them when `store` is true).
    Endpoint("POST", "/v1/files", Operation.FILES),
    Endpoint("GET", "/v1/files", Operation.FILES),
    Endpoint("GET", "/v1/files/{file_id}", Operation.FILES),
    Endpoint("DELETE", "/v1/files/{file_id}", Operation.FILES),
    Endpoint("GET", "/v1/files/{file_id}/content", Operation.FILES),
    Endpoint("POST", "/v1/uploads", Operation.FILES),
    Endpoint("POST", "/v1/uploads/{upload_id}/parts", Operation.FILES),
    Endpoint("POST", "/v1/uploads/{upload_id}/complete", Operation.FILES),
    Endpoint("POST", "/v1/uploads/{upload_id}/cancel", Operation.FILES),
    Endpoint("POST", "/v1/batches", Operation.BATCHES),
    Endpoint("GET", "/v1/batches", Operation.BATCHES),
    Endpoint("GET", "/v1/batches/{batch_id}", Operation.BATCHES),
    Endpoint("POST", "/v1/batches/{batch_id}/cancel", Operation.BATCHES),
    Endpoint("GET", "/v1/chat/completions", Operation.STORED_CONTENT),
    Endpoint("GET", "/v1/chat/completions/{completion_id}", Operation.STORED_CONTENT),
    Endpoint("POST", "/v1/chat/completions/{completion_id}", Operation.STORED_CONTENT),
    Endpoint("DELETE", "/v1/chat/completions/{completion_id}", Operation.STORED_CONTENT),
    Endpoint("GET", "/v1/chat/completions/{completion_id}/messages", Operation.STORED_CONTENT),
)

# Static paths are found with one dict lookup (the hot path); templated
# ones are tried in table order, after.
_STATIC: Mapping[tuple[str, str], Endpoint] = MappingProxyType(
    {(e.method, e.template): e for e in ENDPOINTS if e.is_static}
)
_TEMPLATED: tuple[Endpoint, ...] = tuple(e for e in ENDPOINTS if not e.is_static)


@dataclass(frozen=True, slots=True)
class Match:
    """A request's endpoint and the values of its template's parameters."""

    endpoint: Endpoint
    params: Mapping[str, str]


_NO_PARAMS: Mapping[str, str] = MappingProxyType({})


def match_endpoint(method: str, path: str) -> Match | None:
    """The forwarded endpoint `method path` is, or None when the gateway does not forward it."""
    endpoint = _STATIC.get((method, path))
    if endpoint is not None:
        return Match(endpoint, _NO_PARAMS)
    for endpoint in _TEMPLATED:
        if endpoint.method == method:
            params = endpoint.match(path)
            if params is not None:
                return Match(endpoint, MappingProxyType(params))
    return None


def methods_by_template() -> dict[str, list[str]]:
    """Each template with the methods it is forwarded for (for the app's routes)."""
    out: dict[str, list[str]] = {}
    for endpoint in ENDPOINTS:
        out.setdefault(endpoint.template, []).append(endpoint.method)
    return out


# Operations whose request is a multipart audio upload.
AUDIO_UPLOADS = frozenset({Operation.TRANSCRIPTION, Operation.TRANSLATION})
# Operations that make images (priced per image, or by tokens for gpt-image models).
IMAGE_OPERATIONS = frozenset({Operation.IMAGE, Operation.IMAGE_EDIT, Operation.IMAGE_VARIATION})
# Operations whose request is a multipart image upload.
IMAGE_UPLOADS = frozenset({Operation.IMAGE_EDIT, Operation.IMAGE_VARIATION})
# Operations whose streamed request gets `stream_options.include_usage`.
USAGE_INJECTED = frozenset({Operation.CHAT, Operation.COMPLETION})
# Operations OpenAI may keep content of upstream (`store`): sent `store: false`
# unless the client set `store` itself (zero retention by default).
STORE_DEFAULTED = frozenset({Operation.CHAT, Operation.RESPONSES})
