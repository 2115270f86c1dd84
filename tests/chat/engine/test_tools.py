"""HTTP tools: argument validation, what reaches the tool (body, query, auth), how failures come back, and
what people and the model see (spec, risk, redaction). Calls go to loopback tool servers only."""

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chat.engine.tools import (
    MAX_BODY_BYTES,
    TRUNCATED_MARK,
    ToolResult,
    tool_call_run,
    tool_risk,
    tool_spec,
)
from chat.services.vault import secret_set
from core.models import Team, Tool
from core.redaction import arguments_redact
from core.ssrf import Resolver
from core.tool_arguments import ToolArgumentsInvalid, tool_arguments_parse
from tests.support.tool_server import ToolResponse, ToolServer, tls_context_make

SECRET = "crm-secret-value-do-not-leak-7f3a"

TICKET_SCHEMA = {
    "type": "object",
    "properties": {
        "priority": {"type": "string", "enum": ["low", "high"]},
        "count": {"type": "integer"},
        "customer": {
            "type": "object",
            "properties": {"email": {"type": "string"}, "pin": {"type": "string", "x-redact": True}},
            "required": ["email"],
        },
        "api_token": {"type": "integer"},
        "card": {"type": "string", "x-redact": True},
    },
    "required": ["priority"],
}


def unsaved_tool(**fields) -> Tool:
    """For the pure functions: they read the tool's fields only."""
    return Tool(**{"name": "create_ticket", "method": "POST", "url": "https://crm.example/tickets", **fields})


@pytest.fixture
def team(db) -> Team:
    return Team.objects.create(name="acme")


@pytest.fixture
def allow_loopback(settings) -> None:
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]


def tool_create(team: Team, url: str, **fields) -> Tool:
    """A saved tool, loaded as callers load it: auth secret joined, so no query runs in the event loop."""
    tool = Tool.objects.create(team=team, name=fields.pop("name", "create_ticket"), url=url, **fields)
    return Tool.objects.select_related("auth_secret").get(pk=tool.pk)


def run(tool: Tool, arguments: dict | None = None) -> ToolResult:
    return asyncio.run(tool_call_run(tool=tool, arguments=arguments or {}, idempotency_key="test-key"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Arguments ----------------------------------------------------------------------------------------


def test_valid_arguments_are_returned_as_a_dict() -> None:
    arguments = '{"priority": "high", "count": 2, "customer": {"email": "a@b.c"}}'
    assert tool_arguments_parse(unsaved_tool(parameters=TICKET_SCHEMA), arguments) == {
        "priority": "high",
        "count": 2,
        "customer": {"email": "a@b.c"},
    }


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ('{"priority": "urgent"}', "priority: 'urgent' is not one of ['low', 'high']"),
        ('{"priority": "low", "count": "3"}', "count: '3' is not of type 'integer'"),
        ("{}", "'priority' is a required property"),
        ('{"priority": "low", "customer": {}}', "customer: 'email' is a required property"),
        ("[1, 2]", "arguments must be a JSON object, not an array"),
        ('"high"', "arguments must be a JSON object, not a string"),
        ("null", "arguments must be a JSON object, not null"),
    ],
)
def test_invalid_arguments_are_refused_with_a_message_naming_the_field(arguments: str, message: str) -> None:
    with pytest.raises(ToolArgumentsInvalid) as caught:
        tool_arguments_parse(unsaved_tool(parameters=TICKET_SCHEMA), arguments)
    assert str(caught.value) == message


def test_arguments_that_are_not_json_are_refused() -> None:
    with pytest.raises(ToolArgumentsInvalid, match=r"^arguments are not valid JSON"):
        tool_arguments_parse(unsaved_tool(parameters=TICKET_SCHEMA), '{"priority": "high",')


def test_every_violation_is_reported() -> None:
    with pytest.raises(ToolArgumentsInvalid) as caught:
        tool_arguments_parse(unsaved_tool(parameters=TICKET_SCHEMA), '{"count": "x"}')
    assert set(str(caught.value).split("; ")) == {
        "'priority' is a required property",
        "count: 'x' is not of type 'integer'",
    }


def test_invalid_value_of_a_secret_field_is_not_quoted() -> None:
    with pytest.raises(ToolArgumentsInvalid) as caught:
        tool_arguments_parse(unsaved_tool(parameters=TICKET_SCHEMA), '{"priority": "low", "api_token": "sk-live-123"}')
    assert str(caught.value) == "api_token: invalid value (fails 'type')"


def test_empty_arguments_mean_no_arguments() -> None:
    assert tool_arguments_parse(unsaved_tool(parameters={}), "") == {}
    with pytest.raises(ToolArgumentsInvalid, match="'priority' is a required property"):
        tool_arguments_parse(unsaved_tool(parameters=TICKET_SCHEMA), "  ")


def test_a_broken_schema_is_reported_not_raised_as_a_crash() -> None:
    with pytest.raises(ToolArgumentsInvalid, match="invalid parameters schema"):
        tool_arguments_parse(unsaved_tool(parameters={"type": "objekt"}), "{}")


# --- What reaches the tool -------------------------------------------------------------------------------


def test_post_sends_the_arguments_as_a_json_body(team: Team, tool_server: ToolServer, allow_loopback) -> None:
    tool = tool_create(team, tool_server.url + "/tickets?source=km", method="POST")
    arguments = {"priority": "high", "tags": ["a", "é"], "customer": {"email": "a@b.c"}, "count": 2}
    result = run(tool, arguments)
    assert result.ok
    assert result.status_code == 200
    assert result.body == '{"ok": true}'
    [request] = tool_server.requests
    assert (request.method, request.path, request.query) == ("POST", "/tickets", {"source": ["km"]})
    assert request.headers["content-type"] == "application/json"
    assert request.headers["host"] == f"127.0.0.1:{tool_server.port}"
    assert request.json() == arguments
    assert "authorization" not in request.headers


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_put_and_patch_send_a_json_body(team: Team, tool_server: ToolServer, allow_loopback, method: str) -> None:
    run(tool_create(team, tool_server.url + "/t/1", method=method), {"priority": "low"})
    [request] = tool_server.requests
    assert (request.method, request.json(), request.query) == (method, {"priority": "low"}, {})


def test_get_sends_the_arguments_as_the_query_string(team: Team, tool_server: ToolServer, allow_loopback) -> None:
    tool = tool_create(team, tool_server.url + "/search?limit=1&lang=en", method="GET")
    arguments = {"q": "café & co=1", "limit": 5, "exact": True, "missing": None, "ids": [1, 2], "filter": {"a": "b"}}
    assert run(tool, arguments).ok
    [request] = tool_server.requests
    assert (request.method, request.path, request.body) == ("GET", "/search", b"")
    assert request.query == {
        "lang": ["en"],
        "q": ["café & co=1"],
        "limit": ["5"],
        "exact": ["true"],
        "missing": ["null"],
        "ids": ["[1,2]"],
        "filter": ['{"a":"b"}'],
    }


@pytest.mark.parametrize("method", ["DELETE", "HEAD"])
def test_delete_and_head_send_the_query_string(
    team: Team, tool_server: ToolServer, allow_loopback, method: str
) -> None:
    result = run(tool_create(team, tool_server.url + "/t", method=method), {"id": 7})
    assert result.ok
    [request] = tool_server.requests
    assert (request.method, request.query, request.body) == (method, {"id": ["7"]}, b"")


def test_bearer_auth_sends_the_decrypted_secret(team: Team, tool_server: ToolServer, allow_loopback) -> None:
    secret = secret_set(team=team, name="crm-key", value=SECRET)
    tool = tool_create(team, tool_server.url + "/t", auth_type=Tool.AuthType.BEARER, auth_secret=secret)
    assert run(tool, {"priority": "low"}).ok
    assert tool_server.requests[0].headers["authorization"] == f"Bearer {SECRET}"


def test_header_auth_sends_the_secret_in_the_named_header(team: Team, tool_server: ToolServer, allow_loopback) -> None:
    secret = secret_set(team=team, name="crm-key", value=SECRET)
    tool = tool_create(
        team, tool_server.url + "/t", auth_type=Tool.AuthType.HEADER, auth_header="X-Api-Key", auth_secret=secret
    )
    assert run(tool, {"priority": "low"}).ok
    headers = tool_server.requests[0].headers
    assert headers["x-api-key"] == SECRET
    assert "authorization" not in headers


def test_auth_without_a_secret_is_not_sent(team: Team, tool_server: ToolServer, allow_loopback) -> None:
    result = run(tool_create(team, tool_server.url + "/t", auth_type=Tool.AuthType.BEARER))
    assert not result.sent
    assert "no vault secret" in result.error
    assert tool_server.requests == []


# --- Redirects ------------------------------------------------------------------------------------------------


def test_redirect_on_the_same_origin_is_followed_with_the_secret(
    team: Team, tool_server: ToolServer, allow_loopback
) -> None:
    secret = secret_set(team=team, name="crm-key", value=SECRET)
    tool = tool_create(team, tool_server.url + "/start", auth_type=Tool.AuthType.BEARER, auth_secret=secret)
    tool_server.queue(ToolResponse(status=307, location="/moved"), ToolResponse(body="done"))
    result = run(tool, {"priority": "low"})
    assert (result.ok, result.body) == (True, "done")
    _, second = tool_server.requests
    assert (second.method, second.path, second.json()) == ("POST", "/moved", {"priority": "low"})
    assert second.headers["authorization"] == f"Bearer {SECRET}"


def test_see_other_redirect_turns_a_post_into_a_get_without_body(
    team: Team, tool_server: ToolServer, allow_loopback
) -> None:
    tool_server.queue(ToolResponse(status=303, location="/result/1"))
    assert run(tool_create(team, tool_server.url + "/jobs"), {"priority": "low"}).ok
    second = tool_server.requests[1]
    assert (second.method, second.path, second.body) == ("GET", "/result/1", b"")
    assert "content-type" not in second.headers


def test_redirect_to_another_origin_does_not_carry_the_secret(
    team: Team, tool_server: ToolServer, allow_loopback
) -> None:
    other = ToolServer().start()  # same address, another port: another origin
    try:
        secret = secret_set(team=team, name="crm-key", value=SECRET)
        tool = tool_create(
            team, tool_server.url + "/t", auth_type=Tool.AuthType.HEADER, auth_header="X-Api-Key", auth_secret=secret
        )
        tool_server.queue(ToolResponse(status=302, location=other.url + "/elsewhere"))
        assert run(tool).ok
        [request] = other.requests
        assert request.path == "/elsewhere"
        assert "x-api-key" not in request.headers
    finally:
        other.stop()


def test_more_than_three_redirects_stop_with_an_error(team: Team, tool_server: ToolServer, allow_loopback) -> None:
    tool_server.queue(*[ToolResponse(status=302, location=f"/hop{i}") for i in range(1, 6)])
    result = run(tool_create(team, tool_server.url + "/hop0", method="GET"))
    assert (result.sent, result.status_code, result.ok) == (True, 302, False)
    assert result.error == "too many redirects (more than 3)"
    assert [r.path for r in tool_server.requests] == ["/hop0", "/hop1", "/hop2", "/hop3"]


# --- Failures come back as results ---------------------------------------------------------------------------


def test_non_2xx_answer_is_reported_with_its_body(team: Team, tool_server: ToolServer, allow_loopback) -> None:
    tool_server.queue(ToolResponse(status=422, body='{"detail": "priority unknown"}'))
    result = run(tool_create(team, tool_server.url + "/t"), {"priority": "low"})
    assert (result.sent, result.status_code, result.ok, result.error) == (True, 422, False, "")
    assert json.loads(result.model_content()) == {"status": 422, "body": '{"detail": "priority unknown"}'}


def test_slow_tool_times_out(team: Team, tool_server: ToolServer, allow_loopback, settings) -> None:
    settings.KITEMESH_TOOL_TIMEOUT_SECONDS = 0.3
    tool_server.queue(ToolResponse(delay=5))
    started = time.monotonic()
    result = run(tool_create(team, tool_server.url + "/slow"), {"priority": "low"})
    assert time.monotonic() - started < 2
    assert (result.sent, result.status_code, result.ok) == (True, None, False)
    assert result.error == "the tool did not answer within 0.3 s"
    assert json.loads(result.model_content()) == {"error": "the tool did not answer within 0.3 s"}


def test_refused_connection_is_an_unsent_error(team: Team, allow_loopback) -> None:
    result = run(tool_create(team, f"http://127.0.0.1:{free_port()}/t"), {"priority": "low"})
    assert (result.sent, result.status_code, result.ok) == (False, None, False)
    assert result.error.startswith("could not connect to '127.0.0.1'")


def test_body_over_64_kib_is_truncated(team: Team, tool_server: ToolServer, allow_loopback) -> None:
    tool_server.queue(ToolResponse(size=5 * MAX_BODY_BYTES, content_type="text/plain"))
    result = run(tool_create(team, tool_server.url + "/big", method="GET"))
    assert result.ok
    assert result.body == "x" * MAX_BODY_BYTES + TRUNCATED_MARK


def test_body_of_exactly_64_kib_is_whole(team: Team, tool_server: ToolServer, allow_loopback) -> None:
    tool_server.queue(ToolResponse(size=MAX_BODY_BYTES, content_type="text/plain"))
    assert run(tool_create(team, tool_server.url + "/big", method="GET")).body == "x" * MAX_BODY_BYTES


def test_body_is_decoded_with_its_charset(team: Team, tool_server: ToolServer, allow_loopback) -> None:
    tool_server.queue(ToolResponse(body="naïve", content_type="text/plain; charset=utf-8"))
    assert run(tool_create(team, tool_server.url + "/t", method="GET")).body == "naïve"


# --- The secret never comes back -------------------------------------------------------------------------------


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    # httpcore's DEBUG trace prints response headers as the tool sent them (settings keep it at WARNING);
    # everything else, ours included, is checked down to DEBUG.
    return "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpcore"))


@pytest.mark.parametrize(
    "response",
    [
        ToolResponse(status=500, echo_headers=True),
        ToolResponse(status=200, echo_headers=True),
        ToolResponse(status=302, location=f"http://169.254.169.254/?k={SECRET}"),
        ToolResponse(delay=5),
    ],
    ids=["error-echo", "ok-echo", "blocked-redirect", "timeout"],
)
def test_secret_never_appears_in_the_result_or_logs(
    team: Team, tool_server: ToolServer, allow_loopback, settings, caplog, response: ToolResponse
) -> None:
    settings.KITEMESH_TOOL_TIMEOUT_SECONDS = 0.3
    secret = secret_set(team=team, name="crm-key", value=SECRET)
    tool = tool_create(team, tool_server.url + "/t", auth_type=Tool.AuthType.BEARER, auth_secret=secret)
    tool_server.queue(response)
    with caplog.at_level(logging.DEBUG):
        result = run(tool, {"priority": "low"})
    assert tool_server.requests[0].headers["authorization"] == f"Bearer {SECRET}"  # it was really sent
    for text in (result.body, result.error, result.model_content(), repr(result), _logged(caplog)):
        assert SECRET not in text
    if response.echo_headers:
        assert json.loads(result.body)["authorization"] == "Bearer [redacted]"


def test_secret_is_not_shown_when_the_tool_cannot_be_reached(team: Team, allow_loopback, caplog) -> None:
    secret = secret_set(team=team, name="crm-key", value=SECRET)
    tool = tool_create(team, f"http://127.0.0.1:{free_port()}/t", auth_type=Tool.AuthType.BEARER, auth_secret=secret)
    with caplog.at_level(logging.DEBUG):
        result = run(tool)
    assert not result.sent
    assert SECRET not in result.model_content() + _logged(caplog)


# --- What the model and people see ------------------------------------------------------------------------------


def test_model_content_of_a_sent_call_has_status_and_body() -> None:
    assert json.loads(ToolResult(sent=True, status_code=200, body="é").model_content()) == {"status": 200, "body": "é"}
    assert json.loads(ToolResult(sent=False, status_code=None, body="", error="nope").model_content()) == {
        "error": "nope"
    }


def test_ok_needs_a_sent_2xx_answer_without_error() -> None:
    assert ToolResult(sent=True, status_code=204, body="").ok
    assert not ToolResult(sent=True, status_code=301, body="").ok
    assert not ToolResult(sent=True, status_code=302, body="", error="redirect blocked").ok
    assert not ToolResult(sent=False, status_code=None, body="", error="blocked").ok


def test_tool_spec_is_the_openai_tools_entry() -> None:
    tool = unsaved_tool(description="Create a CRM ticket.", parameters=TICKET_SCHEMA)
    spec = tool_spec(tool)
    assert spec == {
        "type": "function",
        "function": {"name": "create_ticket", "description": "Create a CRM ticket.", "parameters": TICKET_SCHEMA},
    }
    spec["function"]["parameters"]["required"].append("count")
    assert TICKET_SCHEMA["required"] == ["priority"]  # a copy: callers cannot change the tool


def test_tool_spec_of_a_tool_without_parameters_takes_an_empty_object() -> None:
    assert tool_spec(unsaved_tool(parameters={}))["function"]["parameters"] == {"type": "object", "properties": {}}


@pytest.mark.parametrize(
    ("method", "risk"),
    [("GET", "low"), ("HEAD", "low"), ("POST", "medium"), ("PUT", "medium"), ("PATCH", "medium"), ("DELETE", "high")],
)
def test_risk_follows_the_method(method: str, risk: str) -> None:
    assert tool_risk(unsaved_tool(method=method)) == risk


def test_risk_override_wins() -> None:
    assert tool_risk(unsaved_tool(method="GET", risk=Tool.Risk.HIGH)) == "high"
    assert tool_risk(unsaved_tool(method="DELETE", risk=Tool.Risk.LOW)) == "low"


def test_redaction_hides_secret_looking_keys_and_x_redact_fields_at_any_depth() -> None:
    tool = unsaved_tool(parameters=TICKET_SCHEMA)
    arguments = {
        "priority": "high",
        "card": "4111 1111 1111 1111",
        "api_token": 42,
        "customer": {"email": "a@b.c", "pin": "1234", "Password": "pw", "session-token": "t"},
        "headers": [{"Authorization": "Bearer x", "X-Api-Key": "k", "accept": "json"}],
        "client_secret": {"nested": "whole value"},
        "apiKey": "k2",
    }
    assert arguments_redact(tool, arguments) == {
        "priority": "high",
        "card": "[redacted]",
        "api_token": "[redacted]",
        "customer": {"email": "a@b.c", "pin": "[redacted]", "Password": "[redacted]", "session-token": "[redacted]"},
        "headers": [{"Authorization": "[redacted]", "X-Api-Key": "[redacted]", "accept": "json"}],
        "client_secret": "[redacted]",
        "apiKey": "[redacted]",
    }
    assert arguments["customer"]["pin"] == "1234"  # the original is untouched


def test_redaction_follows_array_items_and_additional_properties() -> None:
    schema = {
        "type": "object",
        "properties": {
            "cards": {"type": "array", "items": {"type": "object", "properties": {"cvv": {"x-redact": True}}}}
        },
        "additionalProperties": {"type": "string", "x-redact": True},
    }
    redacted = arguments_redact(unsaved_tool(parameters=schema), {"cards": [{"cvv": "123", "n": 1}], "note": "x"})
    assert redacted == {"cards": [{"cvv": "[redacted]", "n": 1}], "note": "[redacted]"}


# --- Pinning: the connection goes to the address that was checked --------------------------------------------


def resolver(table: dict[str, list[str]], calls: list[str] | None = None) -> Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


def test_name_is_resolved_once_and_the_request_goes_to_that_address(tool_server: ToolServer, settings) -> None:
    # "rebind.test" exists only in this resolver: had httpx looked it up again, the call would have failed.
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]
    calls: list[str] = []
    tool = unsaved_tool(method="GET", url=f"http://rebind.test:{tool_server.port}/hook")
    result = asyncio.run(
        tool_call_run(
            tool=tool, arguments={}, idempotency_key="test-key", resolve=resolver({"rebind.test": ["127.0.0.1"]}, calls)
        )
    )
    assert result.ok
    assert calls == ["rebind.test"]
    assert tool_server.requests[0].headers["host"] == f"rebind.test:{tool_server.port}"


@pytest.fixture
def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ToolServer]:
    """An https tool on 127.0.0.1 whose certificate names tool.test only; the tool client trusts its CA."""
    context, ca_file = tls_context_make(tmp_path, "tool.test")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    server = ToolServer(tls=context).start()
    yield server
    server.stop()


TLS_NAMES = {"tool.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}


def https_call(server: ToolServer, host: str) -> ToolResult:
    tool = unsaved_tool(method="GET", url=f"https://{host}:{server.port}/hook")
    return asyncio.run(tool_call_run(tool=tool, arguments={}, idempotency_key="test-key", resolve=resolver(TLS_NAMES)))


def test_https_tool_is_reached_at_the_checked_address_under_its_name(tls_server: ToolServer, settings) -> None:
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["tool.test"]
    result = https_call(tls_server, "tool.test")
    assert result.ok, result.error
    assert tls_server.server_names == ["tool.test"]
    assert tls_server.requests[0].headers["host"] == f"tool.test:{tls_server.port}"


def test_certificate_is_checked_against_the_host_name_not_the_address(tls_server: ToolServer, settings) -> None:
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["other.test"]
    result = https_call(tls_server, "other.test")
    assert not result.sent
    assert "CERTIFICATE_VERIFY_FAILED" in result.error
    assert tls_server.server_names == ["other.test"]
    assert tls_server.requests == []


def test_connection_verified_for_one_host_is_not_reused_for_another_on_the_same_address(
    tls_server: ToolServer, settings
) -> None:
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["tool.test", "other.test"]

    async def both() -> tuple[ToolResult, ToolResult]:
        # One event loop, so one pooled client: the first connection stays open for reuse.
        first = await tool_call_run(
            tool=unsaved_tool(method="GET", url=f"https://tool.test:{tls_server.port}/"),
            arguments={},
            idempotency_key="test-key",
            resolve=resolver(TLS_NAMES),
        )
        second = await tool_call_run(
            tool=unsaved_tool(method="GET", url=f"https://other.test:{tls_server.port}/"),
            arguments={},
            idempotency_key="test-key",
            resolve=resolver(TLS_NAMES),
        )
        return first, second

    first, second = asyncio.run(both())
    assert first.ok
    assert "CERTIFICATE_VERIFY_FAILED" in second.error
    assert len(tls_server.requests) == 1
