"""The offline `scripted` provider (SPEC §4; README "The scripted model") through the API on the live
server: a group whose brain is `provider: scripted` (no base_url, no network) echoes, fails on `!fail`,
obeys max_tokens, counts usage as ceil(characters / 4), streams a word per chunk, and turns
`!tool NAME {json}` lines into tool calls — the full approval round of the demo, also with
config/demo.yaml exactly as `make run` applies it."""

import io
import json
import math
import uuid
from decimal import Decimal

import httpx
import pytest
from django.conf import settings as django_settings
from django.core.management import call_command

from billing.ledger import credits_grant
from billing.models import CreditAccount, Hold, LedgerEntry
from chat.services.tokens import token_create
from core.models import CustomModel, Execution, Group, Team, Tool, ToolExecution
from tests.conftest import Setup
from tests.support.helpers import sse_chunks
from tests.support.tool_server import ToolResponse, ToolServer

SYSTEM = "You are the scripted brain."
INPUT_PER_1K = Decimal("1")
OUTPUT_PER_1K = Decimal("2")
DEMO_GROUP = "group:00000000-0000-4000-8000-000000000001"


def make_scripted_setup(*, tools: tuple[Tool, ...] = (), team: Team | None = None) -> Setup:
    team = team or Team.objects.create(name="scripted-team")
    credits_grant(team=team, amount=1000, reason="test grant")
    brain = CustomModel.objects.create(
        team=team,
        name="scripted-brain",
        provider=CustomModel.Provider.SCRIPTED,
        model="scripted-1",
        system=SYSTEM,
        input_per_1k=INPUT_PER_1K,
        output_per_1k=OUTPUT_PER_1K,
    )
    group = Group.objects.create(id=uuid.uuid4(), team=team, name="scripted", brain=brain)
    group.tools.add(*tools)
    token, raw = token_create(team=team, name="scripted-test")
    return Setup(team=team, brain=brain, group=group, token=token, raw_token=raw)


@pytest.fixture
def scripted(live) -> Setup:
    return make_scripted_setup()


def complete(http: httpx.Client, setup: Setup, messages: list[dict], **body) -> httpx.Response:
    return http.post(
        "/v1/chat/completions", json={"model": setup.model, "messages": messages, **body}, headers=setup.headers
    )


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def tokens(characters: int) -> int:
    return math.ceil(characters / 4)


def credits_for(prompt_tokens: int, completion_tokens: int) -> int:
    return math.ceil((prompt_tokens * INPUT_PER_1K + completion_tokens * OUTPUT_PER_1K) / 1000)


def tool_results(content: str) -> list:
    """The tool messages of a `Tool results: …` answer, parsed."""
    assert content.startswith("Tool results: "), content
    return [json.loads(part) for part in content.removeprefix("Tool results: ").split(" | ")]


# --- Echo, system, usage --------------------------------------------------------------------------


def test_scripted_brain_replies_with_the_last_user_message(live, http, scripted: Setup):
    messages = [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "What is the weather?"},
    ]

    response = complete(http, scripted, messages)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Scripted reply: What is the weather?"},
            "finish_reason": "stop",
        }
    ]
    assert body["model"] == scripted.model


def test_scripted_brain_does_not_echo_the_system_instructions(live, http, scripted: Setup):
    messages = [{"role": "system", "content": "Client-side system rules."}, *user("Hi")]

    response = complete(http, scripted, messages)

    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    assert content == "Scripted reply: Hi"
    assert SYSTEM not in content
    assert "Client-side" not in content


def test_scripted_brain_also_reads_text_parts(live, http, scripted: Setup):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "parts"}]}]

    response = complete(http, scripted, messages)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Scripted reply: Hello parts"


@pytest.mark.parametrize("text", ["abcd", "abcde", "a slightly longer question, with commas"])
def test_scripted_usage_is_a_quarter_of_the_characters_rounded_up(live, http, scripted: Setup, text: str):
    response = complete(http, scripted, user(text))

    assert response.status_code == 200, response.text
    body = response.json()
    reply = body["choices"][0]["message"]["content"]
    prompt, completion = tokens(len(SYSTEM) + len(text)), tokens(len(reply))
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    assert body["kitemesh"]["credits_charged"] == credits_for(prompt, completion)
    execution = Execution.objects.get(pk=body["kitemesh"]["execution_id"])
    assert (execution.prompt_tokens, execution.completion_tokens) == (prompt, completion)
    step = execution.steps.get()
    assert step.model_name == "scripted-1"
    assert step.usage_estimated is False  # the scripted model reports its usage


# --- max_tokens -----------------------------------------------------------------------------------


def test_max_tokens_cuts_the_scripted_reply_with_finish_reason_length(live, http, scripted: Setup):
    text = "Tell me everything about kites, please."
    full = f"Scripted reply: {text}"

    response = complete(http, scripted, user(text), max_tokens=5)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == full[:20]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_max_completion_tokens_wins_over_max_tokens_for_the_scripted_cut(live, http, scripted: Setup):
    text = "Tell me everything about kites, please."

    response = complete(http, scripted, user(text), max_tokens=2, max_completion_tokens=6)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == f"Scripted reply: {text}"[:24]
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_a_reply_of_exactly_max_tokens_is_not_cut(live, http, scripted: Setup):
    response = complete(http, scripted, user("Hi!!"), max_tokens=5)  # "Scripted reply: Hi!!": 20 characters

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Scripted reply: Hi!!"
    assert response.json()["choices"][0]["finish_reason"] == "stop"


# --- !fail ----------------------------------------------------------------------------------------


def test_fail_directive_answers_502_upstream_error_and_charges_nothing(live, http, scripted: Setup):
    response = complete(http, scripted, user("please !fail now"))

    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "upstream_error"
    assert "scripted-brain" in error["message"]
    assert "500" in error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    execution = Execution.objects.get(team=scripted.team)
    assert execution.status == Execution.Status.FAILED
    assert not LedgerEntry.objects.filter(execution=execution, kind=LedgerEntry.Kind.CHARGE).exists()
    assert not Hold.objects.filter(execution=execution, status=Hold.Status.ACTIVE).exists()
    account = CreditAccount.objects.get(team=scripted.team)
    assert (account.balance, account.held) == (1000, 0)


def test_fail_directive_in_a_stream_is_a_plain_502_before_any_event(live, http, scripted: Setup):
    payload = {"model": scripted.model, "messages": user("!fail"), "stream": True}

    with http.stream("POST", "/v1/chat/completions", json=payload, headers=scripted.headers) as response:
        response.read()

    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "upstream_error"


def test_fail_only_counts_in_the_last_user_message(live, http, scripted: Setup):
    messages = [*user("!fail"), {"role": "assistant", "content": "oops"}, *user("Try again")]

    response = complete(http, scripted, messages)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Scripted reply: Try again"


# --- Streaming ------------------------------------------------------------------------------------


def test_scripted_stream_sends_one_word_per_chunk(live, http, scripted: Setup):
    payload = {
        "model": scripted.model,
        "messages": user("alpha beta gamma"),
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    with http.stream("POST", "/v1/chat/completions", json=payload, headers=scripted.headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(response)

    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    words = [c["choices"][0]["delta"]["content"] for c in chunks[1:] if c["choices"] and c["choices"][0]["delta"]]
    assert words == ["Scripted ", "reply: ", "alpha ", "beta ", "gamma"]
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["choices"][0]["finish_reason"] == "stop"
    assert set(final["kitemesh"]) >= {"execution_id", "credits_charged", "request_id"}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    reply = "Scripted reply: alpha beta gamma"
    prompt, completion = tokens(len(SYSTEM) + len("alpha beta gamma")), tokens(len(reply))
    assert usage_chunk["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def test_scripted_stream_is_cut_by_max_tokens_too(live, http, scripted: Setup):
    payload = {"model": scripted.model, "messages": user("one two three four"), "stream": True, "max_tokens": 4}

    with http.stream("POST", "/v1/chat/completions", json=payload, headers=scripted.headers) as response:
        chunks = sse_chunks(response)

    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Scripted reply: one two three four"[:16]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == [
        "length"
    ]


# --- !tool and the approval round -----------------------------------------------------------------


@pytest.fixture
def health_tool(live, tool_server: ToolServer, settings) -> Tool:
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]
    team = Team.objects.create(name="scripted-team")
    return Tool.objects.create(
        team=team,
        name="health_check",
        description="Check that the service is healthy.",
        method=Tool.Method.GET,
        url=f"{tool_server.url}/health",
        parameters={"type": "object", "properties": {"verbose": {"type": "boolean"}}},
        requires_approval=True,
        price=Decimal(1),
    )


def resume(http: httpx.Client, setup_model: str, headers: dict, paused: dict) -> httpx.Response:
    return http.post(
        "/v1/chat/resume",
        json={
            "model": setup_model,
            "approval_id": paused["kitemesh"]["approval_id"],
            "approved_tool_execution_ids": [c["id"] for c in paused["choices"][0]["message"]["tool_calls"]],
            "messages": [],
        },
        headers=headers,
    )


def test_tool_directive_pauses_then_the_approved_tool_runs_once_and_its_result_is_answered(
    live, http, health_tool: Tool, tool_server: ToolServer
):
    setup = make_scripted_setup(tools=(health_tool,), team=health_tool.team)
    tool_server.queue(ToolResponse(body='{"service": "up", "checks": 3}'))

    paused = complete(http, setup, user('!tool health_check {"verbose": true}'))

    assert paused.status_code == 200, paused.text
    pause = paused.json()
    choice = pause["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert uuid.UUID(call["id"])
    assert call["type"] == "function"
    assert call["function"] == {"name": "health_check", "arguments": '{"verbose": true}'}
    assert set(pause["kitemesh"]) >= {"approval_id", "execution_id", "expires_at", "request_id", "credits_charged"}
    assert ToolExecution.objects.get(pk=call["id"]).call_id == "call_1"
    assert tool_server.requests == []  # not before approval

    answered = resume(http, setup.model, setup.headers, pause)

    assert answered.status_code == 200, answered.text
    answer = answered.json()
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert tool_results(answer["choices"][0]["message"]["content"]) == [
        {"status": 200, "body": '{"service": "up", "checks": 3}'}
    ]
    assert answer["kitemesh"]["execution_id"] == pause["kitemesh"]["execution_id"]
    assert len(tool_server.requests) == 1
    request = tool_server.requests[0]
    assert (request.method, request.path, request.query) == ("GET", "/health", {"verbose": ["true"]})
    assert request.body == b""
    assert ToolExecution.objects.get(pk=call["id"]).status == ToolExecution.Status.SUCCEEDED


def test_each_tool_line_becomes_a_call_in_order(live, http, health_tool: Tool, tool_server: ToolServer):
    setup = make_scripted_setup(tools=(health_tool,), team=health_tool.team)
    tool_server.queue(ToolResponse(body='{"n": 1}'), ToolResponse(body='{"n": 2}'))
    text = 'Please check twice.\n!tool health_check {"verbose": true}\n!tool health_check {"verbose": false}'

    paused = complete(http, setup, user(text))

    assert paused.status_code == 200, paused.text
    pause = paused.json()
    calls = pause["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == ['{"verbose": true}', '{"verbose": false}']
    assert [ToolExecution.objects.get(pk=c["id"]).call_id for c in calls] == ["call_1", "call_2"]

    answered = resume(http, setup.model, setup.headers, pause)

    assert answered.status_code == 200, answered.text
    results = tool_results(answered.json()["choices"][0]["message"]["content"])
    assert sorted(r["body"] for r in results) == ['{"n": 1}', '{"n": 2}']  # the two ran in parallel
    assert sorted(r.query["verbose"][0] for r in tool_server.requests) == ["false", "true"]


def test_tool_directive_without_arguments_calls_the_tool_with_no_arguments(
    live, http, health_tool: Tool, tool_server: ToolServer
):
    setup = make_scripted_setup(tools=(health_tool,), team=health_tool.team)

    paused = complete(http, setup, user("!tool health_check"))

    assert paused.status_code == 200, paused.text
    [call] = paused.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "health_check", "arguments": "{}"}
    answered = resume(http, setup.model, setup.headers, paused.json())
    assert answered.status_code == 200, answered.text
    assert [(r.path, r.query) for r in tool_server.requests] == [("/health", {})]


def test_demo_config_runs_the_full_approval_round_against_the_live_server(live, http, settings):
    """config/demo.yaml as `make run` applies it; the demo tool calls the gateway's own /healthz, which
    here is the live server's."""
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]  # as `make run` sets it
    call_command("apply_config", str(django_settings.BASE_DIR / "config" / "demo.yaml"), stdout=io.StringIO())
    team = Team.objects.get(name="demo")
    assert Group.objects.get(pk=DEMO_GROUP.removeprefix("group:")).team == team
    Tool.objects.filter(team=team, name="health_check").update(url=f"{live.url}/healthz")
    _, raw = token_create(team=team, name="demo-test")
    headers = {"Authorization": f"Bearer {raw}"}

    hello = http.post("/v1/chat/completions", json={"model": DEMO_GROUP, "messages": user("Hello")}, headers=headers)
    assert hello.status_code == 200, hello.text
    assert hello.json()["choices"][0]["message"]["content"] == "Scripted reply: Hello"

    paused = http.post(
        "/v1/chat/completions",
        json={"model": DEMO_GROUP, "messages": user('!tool health_check {"verbose": true}')},
        headers=headers,
    )
    assert paused.status_code == 200, paused.text
    pause = paused.json()
    [call] = pause["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "health_check", "arguments": '{"verbose": true}'}
    approval = http.get(f"/v1/approvals/{pause['kitemesh']['approval_id']}", headers=headers)
    assert approval.status_code == 200, approval.text
    assert approval.json()["status"] == "pending"

    answered = resume(http, DEMO_GROUP, headers, pause)

    assert answered.status_code == 200, answered.text
    answer = answered.json()
    [result] = tool_results(answer["choices"][0]["message"]["content"])
    assert result["status"] == 200
    assert json.loads(result["body"]) == {"status": "ok"}
    assert answer["kitemesh"]["execution_id"] == pause["kitemesh"]["execution_id"]
    tool_execution = ToolExecution.objects.get(pk=call["id"])
    assert tool_execution.status == ToolExecution.Status.SUCCEEDED
    assert tool_execution.response_status == 200
    assert http.get(f"/v1/approvals/{pause['kitemesh']['approval_id']}", headers=headers).json()["status"] == "resumed"
