"""The endpoint table: one row per forwarded method + path template."""

from budget.operations import ENDPOINTS, Operation, match_endpoint, methods_by_template


def test_static_paths_match_their_operation() -> None:
    """Every metered POST path maps to its operation; the method is part of the key."""
    chat = match_endpoint("POST", "/v1/chat/completions")
    assert chat is not None and chat.endpoint.operation is Operation.CHAT
    assert chat.endpoint.metered and dict(chat.params) == {}
    audio = match_endpoint("POST", "/v1/audio/transcriptions")
    assert audio is not None and audio.endpoint.operation is Operation.TRANSCRIPTION
    assert match_endpoint("PUT", "/v1/chat/completions") is None
    assert match_endpoint("POST", "/v1/chat/completions/") is None
    assert match_endpoint("POST", "/v1/unknown") is None


def test_templates_match_exactly_one_segment() -> None:
    """`{model}` stands for one non-empty segment, and its value is returned."""
    found = match_endpoint("GET", "/v1/models/gpt-4o-mini")
    assert found is not None
    assert found.endpoint.template == "/v1/models/{model}"
    assert dict(found.params) == {"model": "gpt-4o-mini"}
    assert not found.endpoint.metered
    assert match_endpoint("GET", "/v1/models/") is None
    assert match_endpoint("GET", "/v1/models/a/b") is None
    listing = match_endpoint("GET", "/v1/models")
    assert listing is not None and listing.endpoint.operation is Operation.MODELS


def test_routes_are_derived_from_the_table() -> None:
    """Each (method, template) row appears once in the routes the app builds."""
    routes = methods_by_template()
    assert sum(len(methods) for methods in routes.values()) == len(ENDPOINTS)
    assert len({(e.method, e.template) for e in ENDPOINTS}) == len(ENDPOINTS)
    assert routes["/v1/chat/completions"] == ["POST", "GET"]


def test_stored_completions_are_unmetered_stored_content() -> None:
    """Listing and reading stored chat completions: stored content, no hold, no usage event."""
    for method, path in (
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/chat/completions/chatcmpl-1"),
        ("POST", "/v1/chat/completions/chatcmpl-1"),
        ("DELETE", "/v1/chat/completions/chatcmpl-1"),
        ("GET", "/v1/chat/completions/chatcmpl-1/messages"),
    ):
        found = match_endpoint(method, path)
        assert found is not None and found.endpoint.operation is Operation.STORED_CONTENT
        assert not found.endpoint.metered
