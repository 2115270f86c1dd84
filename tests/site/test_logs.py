"""Logs: KITEMESH_LOG_FORMAT=json writes one JSON object a line with the request id of the request being
served (production's default), text stays plain; no API token, upstream key or tool secret ever reaches a
log line, checked on a real server process in the production format."""

import contextvars
import importlib
import json
import logging
import sys

import httpx
import pytest

from chat.services.vault import secret_set
from core.logs import JsonFormatter, logging_config, request_id_var
from core.models import Tool
from tests.conftest import UPSTREAM_API_KEY, Setup
from tests.support.server_process import ServerProcess
from tests.support.tool_server import ToolResponse, ToolServer
from tests.support.upstream import Reply

TOOL_SECRET = "tool-secret-d0-not-log"


def record(message: str, *args: object, level: int = logging.WARNING, **fields: object) -> logging.LogRecord:
    made = logging.LogRecord("chat.engine.providers", level, __file__, 1, message, args, None)
    made.__dict__.update(fields)
    return made


def formatted(made: logging.LogRecord, request_id: str | None = None) -> dict:
    """The record as JsonFormatter writes it, while serving `request_id` (if any)."""

    def run() -> str:
        if request_id:
            request_id_var.set(request_id)
        return JsonFormatter().format(made)

    line = contextvars.copy_context().run(run)
    assert "\n" not in line
    return json.loads(line)


# --- The formatter ------------------------------------------------------------------------------------


def test_a_json_line_has_time_level_logger_and_message():
    entry = formatted(record("upstream %s answered HTTP %s", "brain", 500))

    assert entry.keys() == {"time", "level", "logger", "message"}
    assert (entry["level"], entry["logger"]) == ("WARNING", "chat.engine.providers")
    assert entry["message"] == "upstream brain answered HTTP 500"
    assert entry["time"].endswith("+00:00")


def test_a_line_written_while_a_request_is_served_carries_its_id():
    assert formatted(record("tool ran"), request_id="req_abc")["request_id"] == "req_abc"
    assert formatted(record("tool ran", request_id="req_given"), request_id="req_abc")["request_id"] == "req_given"


def test_an_exception_is_one_field_of_the_same_line():
    try:
        raise ValueError("boom")
    except ValueError:
        made = record("Unhandled error", exc_info=sys.exc_info())

    entry = formatted(made)

    assert entry["exc_info"].startswith("Traceback")
    assert entry["exc_info"].endswith("ValueError: boom")


def test_tokens_and_bearer_values_quoted_by_a_message_are_redacted():
    token = "km_" + "A1b2C3d4" * 5
    made = record("refused %s; headers: Authorization: Bearer sk-live-123, next", token)

    try:
        raise RuntimeError(f"bad token {token}")
    except RuntimeError:
        made.exc_info = sys.exc_info()
    line = JsonFormatter().format(made)

    assert token not in line
    assert "sk-live-123" not in line
    assert json.loads(line)["message"] == "refused [redacted]; headers: Authorization: Bearer [redacted], next"


# --- Selecting it -------------------------------------------------------------------------------------


def test_json_format_uses_the_json_formatter_for_every_line_and_uvicorns():
    config = logging_config(log_format="json", level="INFO")

    assert config["handlers"]["console"]["formatter"] == "json"
    assert config["formatters"]["json"]["()"] is JsonFormatter
    assert config["loggers"]["uvicorn.access"]["handlers"] == ["console"]
    assert config["root"] == {"handlers": ["console"], "level": "INFO"}


def test_text_format_writes_plain_lines_and_an_unknown_format_is_refused():
    assert "formatter" not in logging_config(log_format="text", level="INFO")["handlers"]["console"]
    with pytest.raises(ValueError, match="KITEMESH_LOG_FORMAT"):
        logging_config(log_format="yaml", level="INFO")


@pytest.mark.parametrize(("log_format", "formatter"), [(None, "json"), ("text", None)])
def test_production_settings_log_json_unless_told_otherwise(monkeypatch, log_format, formatter):
    for name in ("DJANGO_SECRET_KEY", "KITEMESH_VAULT_KEY", "DJANGO_ALLOWED_HOSTS"):
        monkeypatch.setenv(name, "x")
    if log_format:
        monkeypatch.setenv("KITEMESH_LOG_FORMAT", log_format)
    else:
        monkeypatch.delenv("KITEMESH_LOG_FORMAT", raising=False)
    monkeypatch.delitem(sys.modules, "kitemesh_site.settings.production", raising=False)

    production = importlib.import_module("kitemesh_site.settings.production")

    assert production.LOGGING["handlers"]["console"].get("formatter") == formatter


# --- A real server process ------------------------------------------------------------------------------


@pytest.fixture
def json_server(live) -> ServerProcess:
    server = ServerProcess(env={"KITEMESH_LOG_FORMAT": "json", "KITEMESH_LOG_LEVEL": "INFO"})
    yield server.start()
    server.close()


def test_a_server_logs_json_lines_with_request_ids_and_never_a_secret(
    json_server: ServerProcess, setup: Setup, upstream, tool_server: ToolServer, group_tool
):
    tool = group_tool("lookup_order", method="GET")
    Tool.objects.filter(pk=tool.pk).update(
        auth_type=Tool.AuthType.BEARER, auth_secret=secret_set(team=setup.team, name="crm", value=TOOL_SECRET)
    )
    # The upstream quotes our key back in its error; the tool echoes the request's headers in its error.
    quoted = {"error": {"message": f"Incorrect API key provided: {UPSTREAM_API_KEY}"}}
    upstream.queue(
        Reply(status=401, error_body=quoted),
        Reply(content=None, chunks=[], finish_reason="tool_calls", tool_calls=[_call("lookup_order")]),
        Reply(content="Done."),
    )
    tool_server.queue(ToolResponse(status=500, echo_headers=True))
    wrong_token = "km_" + "Z" * 43

    with httpx.Client(base_url=json_server.url, timeout=30) as http:
        failed = _chat(http, setup)
        assert _chat(http, setup, metadata={"request_id": "req_client_42"}).status_code == 200
        assert _chat(http, setup, headers={"Authorization": f"Bearer {wrong_token}"}).status_code == 401
    assert failed.status_code == 502

    lines = [line for line in json_server.output().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    output = "\n".join(lines)
    for secret in (setup.raw_token, wrong_token, UPSTREAM_API_KEY, TOOL_SECRET):
        assert secret not in output
    upstream_warning = next(e for e in entries if e["logger"] == "chat.engine.providers")
    assert upstream_warning["request_id"] == failed.headers["X-Request-ID"]
    assert upstream_warning["message"] == "upstream brain answered HTTP 401"
    tool_line = next(e for e in entries if e["logger"] == "chat.engine.tools")
    assert tool_line["request_id"] == "req_client_42"


def _call(name: str) -> dict:
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": "{}"}}


def _chat(http: httpx.Client, setup: Setup, headers: dict | None = None, **body: object) -> httpx.Response:
    payload = {"model": setup.model, "messages": [{"role": "user", "content": "Hi"}], **body}
    return http.post("/v1/chat/completions", json=payload, headers=headers or setup.headers)
