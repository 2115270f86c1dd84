"""SPEC section 2, POST /v1/chat/completions: every body rule answers 400 in the one error envelope,
naming the field, and nothing reaches the upstream. Also the 404/403 of the `model` field, unknown
API paths, and the 413 body-size guard on the live ASGI server."""

import json
import os
import socket
import uuid

import pytest

from chat.services.tokens import token_create
from core.models import Group
from tests.conftest import Setup, make_setup

PATH = "/v1/chat/completions"
USER = {"role": "user", "content": "Hi"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
ASSISTANT_CALLS = {"role": "assistant", "content": None, "tool_calls": [CALL]}
TOOL_REPLY = {"role": "tool", "tool_call_id": "call_1", "content": "42"}
DROP = object()  # marks a field to remove from the valid base body


def chat_body(setup: Setup, **overrides) -> dict:
    body = {"model": setup.model, "messages": [USER], **overrides}
    return {key: value for key, value in body.items() if value is not DROP}


def post(http, setup: Setup, data, *, token: str | None = None):
    """POST a body (a dict as JSON, or raw) to the live server, as a client would."""
    raw = data if isinstance(data, str | bytes) else json.dumps(data)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token or setup.raw_token}"}
    return http.post(PATH, content=raw, headers=headers)


def error_of(response, status: int) -> dict:
    """The envelope's `error`, after checking the status, the one-key shape and the request id header."""
    assert response.status_code == status, response.content
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error


def assert_invalid(response, param: str | None, code: str = "invalid_request_error") -> dict:
    error = error_of(response, 400)
    expected_keys = {"message", "type", "code", "request_id"} | ({"param"} if param is not None else set())
    assert set(error) == expected_keys
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert error.get("param") == param
    assert error["request_id"].startswith("req_")
    return error


# --- The body is not a JSON object -----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("{", id="truncated"),
        pytest.param("", id="empty"),
        pytest.param("model=group:x", id="form-encoded"),
        pytest.param("{'model': 'x'}", id="single-quotes"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param("[" * 100_000 + "]" * 100_000, id="nested-too-deep"),
    ],
)
def test_body_that_is_not_json_is_rejected_as_invalid_json_without_param(http, setup: Setup, upstream, raw):
    response = post(http, setup, raw)

    assert_invalid(response, None, code="invalid_json")
    assert upstream.received == []


@pytest.mark.parametrize("raw", ["[]", '"hello"', "null", "42", "true", json.dumps([USER])])
def test_json_body_that_is_not_an_object_is_rejected_without_param(http, setup: Setup, upstream, raw):
    response = post(http, setup, raw)

    assert_invalid(response, None, code="invalid_json")
    assert upstream.received == []


# --- One bad field at a time -------------------------------------------------------------------------

BAD_FIELDS = [
    # model
    ("model-missing", {"model": DROP}, "model"),
    ("model-null", {"model": None}, "model"),
    ("model-number", {"model": 123}, "model"),
    ("model-plain-name", {"model": "gpt-4o-mini"}, "model"),
    ("model-bare-uuid", {"model": str(uuid.uuid4())}, "model"),
    ("model-empty-group", {"model": "group:"}, "model"),
    ("model-group-not-uuid", {"model": "group:support"}, "model"),
    ("model-object", {"model": {"id": "group:x"}}, "model"),
    # messages
    ("messages-missing", {"messages": DROP}, "messages"),
    ("messages-null", {"messages": None}, "messages"),
    ("messages-string", {"messages": "Hi"}, "messages"),
    ("messages-object", {"messages": USER}, "messages"),
    ("messages-empty", {"messages": []}, "messages"),
    ("message-string", {"messages": ["Hi"]}, "messages.0"),
    ("second-message-number", {"messages": [USER, 5]}, "messages.1"),
    ("message-null", {"messages": [USER, None]}, "messages.1"),
    ("role-unknown", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("role-legacy-function", {"messages": [USER, {"role": "function", "content": "x"}]}, "messages.1.role"),
    ("role-missing", {"messages": [{"content": "Hi"}]}, "messages.0.role"),
    ("role-uppercase", {"messages": [{"role": "USER", "content": "Hi"}]}, "messages.0.role"),
    ("role-list", {"messages": [{"role": ["user"], "content": "Hi"}]}, "messages.0.role"),
    ("role-object", {"messages": [{"role": {"name": "user"}, "content": "Hi"}]}, "messages.0.role"),
    ("content-missing", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("content-missing-second", {"messages": [USER, {"role": "system"}]}, "messages.1.content"),
    ("user-content-null", {"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ("content-number", {"messages": [{"role": "user", "content": 42}]}, "messages.0.content"),
    ("content-bool", {"messages": [{"role": "user", "content": True}]}, "messages.0.content"),
    (
        "content-object",
        {"messages": [{"role": "user", "content": {"type": "text", "text": "x"}}]},
        "messages.0.content",
    ),
    ("content-part-string", {"messages": [{"role": "user", "content": ["Hi"]}]}, "messages.0.content.0"),
    (
        "content-part-image",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/i.png"}}]}]},
        "messages.0.content.0",
    ),
    (
        "content-part-text-number",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
        "messages.0.content.0",
    ),
    (
        "content-second-part-no-text",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]},
        "messages.0.content.1",
    ),
    ("no-user-message", {"messages": [{"role": "system", "content": "Be brief."}]}, "messages"),
    (
        "only-assistant-and-developer",
        {"messages": [{"role": "developer", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "messages",
    ),
    (
        "tool-message-without-tool-call-id",
        {"messages": [USER, ASSISTANT_CALLS, {"role": "tool", "content": "42"}]},
        "messages.2.tool_call_id",
    ),
    (
        "tool-message-tool-call-id-number",
        {"messages": [USER, ASSISTANT_CALLS, {"role": "tool", "tool_call_id": 7, "content": "42"}]},
        "messages.2.tool_call_id",
    ),
    (
        "assistant-content-null-without-tool-calls",
        {"messages": [USER, {"role": "assistant", "content": None}]},
        "messages.1.content",
    ),
    (
        "tool-calls-object",
        {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": CALL}]},
        "messages.1.tool_calls",
    ),
    (
        "tool-calls-empty",
        {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": []}]},
        "messages.1.tool_calls",
    ),
    (
        "tool-call-string",
        {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": ["call_1"]}]},
        "messages.1.tool_calls.0",
    ),
    (
        "tool-call-without-id",
        {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{**CALL, "id": None}]}]},
        "messages.1.tool_calls.0",
    ),
    (
        "tool-call-without-function",
        {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}]},
        "messages.1.tool_calls.0",
    ),
    (
        "tool-call-arguments-object",
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}],
                },
            ]
        },
        "messages.1.tool_calls.0",
    ),
    (
        "second-tool-call-without-name",
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [CALL, {"id": "c2", "type": "function", "function": {"arguments": "{}"}}],
                },
            ]
        },
        "messages.1.tool_calls.1",
    ),
    # stream
    ("stream-string", {"stream": "true"}, "stream"),
    ("stream-number", {"stream": 1}, "stream"),
    # max_tokens / max_completion_tokens
    ("max-tokens-zero", {"max_tokens": 0}, "max_tokens"),
    ("max-tokens-negative", {"max_tokens": -5}, "max_tokens"),
    ("max-tokens-float", {"max_tokens": 10.5}, "max_tokens"),
    ("max-tokens-bool", {"max_tokens": True}, "max_tokens"),
    ("max-tokens-string", {"max_tokens": "10"}, "max_tokens"),
    ("max-completion-tokens-zero", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("max-completion-tokens-negative", {"max_completion_tokens": -1}, "max_completion_tokens"),
    ("max-completion-tokens-float", {"max_completion_tokens": 2.5}, "max_completion_tokens"),
    ("max-completion-tokens-bool", {"max_completion_tokens": True}, "max_completion_tokens"),
    ("max-completion-tokens-string", {"max_completion_tokens": "10"}, "max_completion_tokens"),
    ("max-tokens-bad-although-max-completion-good", {"max_tokens": 0, "max_completion_tokens": 10}, "max_tokens"),
    # temperature
    ("temperature-below-0", {"temperature": -0.1}, "temperature"),
    ("temperature-above-2", {"temperature": 2.01}, "temperature"),
    ("temperature-string", {"temperature": "0.5"}, "temperature"),
    ("temperature-bool", {"temperature": True}, "temperature"),
    # metadata
    ("metadata-string", {"metadata": "x"}, "metadata"),
    ("metadata-array", {"metadata": [{"request_id": "a"}]}, "metadata"),
    ("metadata-request-id-129-chars", {"metadata": {"request_id": "r" * 129}}, "metadata.request_id"),
    ("metadata-request-id-number", {"metadata": {"request_id": 12345}}, "metadata.request_id"),
    ("metadata-request-id-empty", {"metadata": {"request_id": ""}}, "metadata.request_id"),
    ("metadata-mode-unknown", {"metadata": {"mode": "turbo"}}, "metadata.mode"),
    ("metadata-mode-capitalised", {"metadata": {"mode": "Normal"}}, "metadata.mode"),
    ("metadata-mode-number", {"metadata": {"mode": 1}}, "metadata.mode"),
    # stream_options
    ("stream-options-string", {"stream": True, "stream_options": "include_usage"}, "stream_options"),
    ("stream-options-array", {"stream_options": [True]}, "stream_options"),
    (
        "include-usage-string",
        {"stream": True, "stream_options": {"include_usage": "true"}},
        "stream_options.include_usage",
    ),
    ("include-usage-number", {"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    # passthrough fields
    ("top-p-negative", {"top_p": -0.01}, "top_p"),
    ("top-p-above-1", {"top_p": 1.5}, "top_p"),
    ("top-p-string", {"top_p": "0.9"}, "top_p"),
    ("stop-5-strings", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("stop-number-in-array", {"stop": ["a", 1]}, "stop"),
    ("stop-number", {"stop": 5}, "stop"),
    ("seed-float", {"seed": 1.5}, "seed"),
    ("seed-string", {"seed": "42"}, "seed"),
    ("response-format-without-type", {"response_format": {}}, "response_format"),
    ("response-format-string", {"response_format": "json_object"}, "response_format"),
    ("user-number", {"user": 42}, "user"),
    ("user-object", {"user": {"id": "u1"}}, "user"),
]


@pytest.mark.parametrize(("overrides", "param"), [pytest.param(o, p, id=name) for name, o, p in BAD_FIELDS])
def test_invalid_field_is_rejected_with_400_naming_the_field_and_no_upstream_call(
    http, setup: Setup, upstream, overrides, param
):
    response = post(http, setup, chat_body(setup, **overrides))

    assert_invalid(response, param)
    assert upstream.received == []


def test_every_validation_error_gets_a_fresh_generated_request_id(http, setup: Setup, upstream):
    first = assert_invalid(post(http, setup, chat_body(setup, stream="yes")), "stream")
    second = assert_invalid(post(http, setup, chat_body(setup, stream="yes")), "stream")

    assert first["request_id"] != second["request_id"]
    assert len(first["request_id"]) > len("req_")


# --- Valid bodies the rules must let through -----------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([USER, ASSISTANT_CALLS, TOOL_REPLY], id="content-null"),
        pytest.param(
            [USER, {"role": "assistant", "tool_calls": [CALL]}, TOOL_REPLY],
            id="content-absent",
        ),
        pytest.param(
            [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
                ASSISTANT_CALLS,
                TOOL_REPLY,
                {"role": "assistant", "content": "Done."},
                USER,
            ],
            id="all-roles-and-text-parts",
        ),
    ],
)
def test_assistant_with_tool_calls_and_no_content_is_valid_and_reaches_the_upstream(
    http, setup: Setup, upstream, messages
):
    response = post(http, setup, chat_body(setup, messages=messages))

    assert response.status_code == 200, response.content
    assert response.json()["choices"][0]["message"]["content"] == "Hello from upstream."
    assert len(upstream.received) == 1
    sent = upstream.received[0].body["messages"]
    assert sent[1:] == messages  # after the brain's system message
    assert any(m.get("tool_calls") == [CALL] for m in sent)


def test_unknown_top_level_fields_are_ignored(http, setup: Setup, upstream):
    body = chat_body(setup, frobnicate=True, n=3, logit_bias={"50256": -100}, extra={"nested": [1, 2]})

    response = post(http, setup, body)

    assert response.status_code == 200, response.content
    assert response.json()["object"] == "chat.completion"
    assert len(upstream.received) == 1
    sent = upstream.received[0].body
    assert not {"frobnicate", "extra"} & set(sent)


def test_boundary_values_are_accepted_and_passthrough_fields_reach_the_brain(http, setup: Setup, upstream):
    body = chat_body(
        setup,
        temperature=2,
        top_p=0,
        stop=["a", "b", "c", "d"],
        seed=-7,
        response_format={"type": "json_object"},
        user="end-user-1",
        max_tokens=1,
        stream=False,
        stream_options={"include_usage": False},
        metadata={"request_id": "r" * 128, "mode": "normal", "tenant": "t1"},
    )

    response = post(http, setup, body)

    assert response.status_code == 200, response.content
    assert response.headers["X-Request-ID"] == "r" * 128
    sent = upstream.received[0].body
    assert sent["temperature"] == 2
    assert sent["top_p"] == 0
    assert sent["stop"] == ["a", "b", "c", "d"]
    assert sent["seed"] == -7
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["user"] == "end-user-1"
    assert sent["max_tokens"] == 1


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"max_tokens": 50, "max_completion_tokens": 20}, 20, id="both-completion-smaller"),
        pytest.param({"max_tokens": 20, "max_completion_tokens": 50}, 50, id="both-completion-larger"),
        pytest.param({"max_completion_tokens": 33}, 33, id="only-max-completion-tokens"),
        pytest.param({"max_tokens": 44}, 44, id="only-max-tokens"),
    ],
)
def test_max_completion_tokens_wins_over_max_tokens(http, setup: Setup, upstream, fields, expected):
    response = post(http, setup, chat_body(setup, **fields))

    assert response.status_code == 200, response.content
    assert upstream.received[0].body["max_tokens"] == expected


# --- The client's request id -------------------------------------------------------------------------


def test_client_request_id_is_echoed_on_success(http, setup: Setup, upstream):
    response = post(http, setup, chat_body(setup, metadata={"request_id": "client-ok-1"}))

    assert response.status_code == 200, response.content
    assert response.headers["X-Request-ID"] == "client-ok-1"
    assert response.json()["kitemesh"]["request_id"] == "client-ok-1"


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        pytest.param({"seed": 1.5}, "seed", id="seed"),
        pytest.param({"max_tokens": 0}, "max_tokens", id="max_tokens"),
        pytest.param({"user": 1}, "user", id="user"),
        pytest.param({"temperature": 5}, "temperature", id="temperature"),
        pytest.param({"stream": "yes"}, "stream", id="stream"),
        pytest.param({"stream_options": {"include_usage": "y"}}, "stream_options.include_usage", id="include_usage"),
        pytest.param({"metadata": {"request_id": "client-req-7", "mode": "turbo"}}, "metadata.mode", id="mode"),
    ],
)
def test_client_request_id_is_echoed_when_a_later_field_fails(http, setup: Setup, upstream, overrides, param):
    body = chat_body(setup, metadata={"request_id": "client-req-7"})
    body.update(overrides)  # the bad field comes after metadata in the body

    response = post(http, setup, body)

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == param
    assert response.headers["X-Request-ID"] == "client-req-7"
    assert error["request_id"] == "client-req-7"
    assert upstream.received == []


# --- model: unknown, another team's, outside the token's scope -------------------------------------------


def test_unknown_group_is_404_model_not_found(http, setup: Setup, upstream):
    response = post(http, setup, chat_body(setup, model=f"group:{uuid.uuid4()}"))

    error = error_of(response, 404)
    assert error["type"] == "not_found_error"
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert upstream.received == []


def test_group_of_another_team_is_404_model_not_found(http, setup: Setup, upstream):
    other = make_setup(upstream, team_name="other")

    response = post(http, setup, chat_body(setup, model=other.model))

    error = error_of(response, 404)
    assert error["type"] == "not_found_error"
    assert error["code"] == "model_not_found"
    assert upstream.received == []
    # The other team's own token may use it: the 404 is about ownership, not about the group.
    assert post(http, other, chat_body(other)).status_code == 200


def test_group_outside_the_token_scope_is_403_permission_denied(http, setup: Setup, upstream):
    other_group = Group.objects.create(id=uuid.uuid4(), team=setup.team, name="billing", brain=setup.brain)
    _, scoped_raw = token_create(team=setup.team, name="scoped", groups=[other_group])

    response = post(http, setup, chat_body(setup), token=scoped_raw)

    error = error_of(response, 403)
    assert error["type"] == "permission_error"
    assert error["code"] == "permission_denied"
    assert upstream.received == []
    # The same token is fine on the group it is scoped to.
    assert post(http, setup, chat_body(setup, model=f"group:{other_group.id}"), token=scoped_raw).status_code == 200
    assert len(upstream.received) == 1


# --- Unknown API paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_unknown_api_path_is_404_in_the_error_envelope(live, http, method):
    response = http.request(method, "/v1/whatever", json={"model": "x"})

    error = error_of(response, 404)
    assert error["type"] == "not_found_error"


# --- 413: body over KITEMESH_MAX_BODY_BYTES ----------------------------------------------------------------

SMALL_LIMIT = 4096


def big_body(setup: Setup, size: int) -> bytes:
    """A valid request whose JSON is exactly `size` bytes (padded in the user message)."""
    empty = json.dumps(chat_body(setup, messages=[{"role": "user", "content": ""}])).encode()
    body = json.dumps(chat_body(setup, messages=[{"role": "user", "content": "x" * (size - len(empty))}])).encode()
    assert len(body) == size
    return body


def chunks_of(data: bytes, size: int = 1000):
    for start in range(0, len(data), size):
        yield data[start : start + size]


def assert_too_large(response) -> None:
    error = error_of(response, 413)
    assert set(error) == {"message", "type", "code", "request_id"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "request_too_large"
    assert error["request_id"].startswith("req_")


def test_body_over_the_limit_with_content_length_is_413_on_the_live_server(live, http, setup, upstream, settings):
    settings.KITEMESH_MAX_BODY_BYTES = SMALL_LIMIT
    body = big_body(setup, SMALL_LIMIT + 1)

    response = http.post(PATH, content=body, headers={**setup.headers, "Content-Type": "application/json"})

    assert response.request.headers["content-length"] == str(SMALL_LIMIT + 1)
    assert_too_large(response)
    assert upstream.received == []


def test_chunked_body_over_the_limit_is_413_on_the_live_server(live, http, setup, upstream, settings):
    settings.KITEMESH_MAX_BODY_BYTES = SMALL_LIMIT
    body = big_body(setup, SMALL_LIMIT + 1)

    response = http.post(PATH, content=chunks_of(body), headers={**setup.headers, "Content-Type": "application/json"})

    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.request.headers
    assert_too_large(response)
    assert upstream.received == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_exactly_at_the_limit_is_served_on_the_live_server(live, http, setup, upstream, settings, chunked):
    settings.KITEMESH_MAX_BODY_BYTES = SMALL_LIMIT
    body = big_body(setup, SMALL_LIMIT)

    response = http.post(
        PATH,
        content=chunks_of(body) if chunked else body,
        headers={**setup.headers, "Content-Type": "application/json"},
    )

    assert response.status_code == 200, response.text
    assert len(upstream.received) == 1


@pytest.mark.skipif("KITEMESH_MAX_BODY_BYTES" in os.environ, reason="the default limit is overridden")
def test_default_limit_is_8_mib_and_answered_before_the_body_is_read(live, setup, upstream):
    declared = 8 * 1024 * 1024 + 1
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {setup.raw_token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"model": "')  # then nothing more: the guard must not wait for the rest
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            received += data

    head_part, _, body_part = received.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 413")
    headers = {}
    for line in head_part.decode().split("\r\n")[1:]:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    error = json.loads(body_part)["error"]
    assert error["code"] == "request_too_large"
    assert error["type"] == "invalid_request_error"
    assert error["request_id"] == headers["x-request-id"]
    assert upstream.received == []
