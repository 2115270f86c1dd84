"""The brain's tool loop without approvals (SPEC §1 Tool, §2 POST /v1/chat/completions, §3 tool prices), through
the live server: tools run and their results go back to the brain as tool messages, several calls of a round
run in parallel, the token's scope decides what is offered, invalid or unknown calls are not sent, the loop is
bounded, prices are charged, and the same with streamed tool calls."""

import json
import math
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import openai
import pytest

from billing.models import LedgerEntry
from chat.engine.modes.normal import MAX_TOOL_ROUNDS
from chat.services.tokens import token_create
from core.models import Execution, Tool, ToolExecution
from tests.conftest import Setup
from tests.support.helpers import credits, sse_chunks, wait_for
from tests.support.tool_server import ToolResponse, ToolServer
from tests.support.upstream import Reply

INPUT_PER_1K = 10
OUTPUT_PER_1K = 20
TICKET_SCHEMA = {
    "type": "object",
    "properties": {
        "priority": {"type": "string", "enum": ["low", "high"]},
        "title": {"type": "string"},
    },
    "required": ["priority"],
    "additionalProperties": False,
}
ORDER_SCHEMA = {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}


def sdk(live, setup: Setup) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=setup.raw_token, max_retries=0)


def chat(http: httpx.Client, setup: Setup, *, headers: dict | None = None, **body) -> httpx.Response:
    payload = {"model": setup.model, "messages": [{"role": "user", "content": "Open a ticket"}], **body}
    return http.post("/v1/chat/completions", json=payload, headers=headers or setup.headers)


def call(name: str, arguments: dict | str, call_id: str = "call_1") -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def tools_reply(*calls: dict, usage: dict | None = None, pieces: int = 0) -> Reply:
    """The brain asking for tools (no text)."""
    return Reply(
        content=None,
        chunks=[],
        tool_calls=list(calls),
        finish_reason="tool_calls",
        usage=usage or {"prompt_tokens": 11, "completion_tokens": 7},
        tool_call_pieces=pieces,
    )


def tool_messages(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m["role"] == "tool"]


def model_cost(prompt_tokens: int, completion_tokens: int) -> Decimal:
    return Decimal(prompt_tokens * INPUT_PER_1K + completion_tokens * OUTPUT_PER_1K) / 1000


@pytest.fixture
def second_tool_server():
    server = ToolServer().start()
    yield server
    server.stop()


# --- A tool that needs no approval -----------------------------------------------------------------


def test_tool_without_approval_runs_and_the_brain_gets_its_status_and_body(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA, path="/orders")
    tool_server.queue(ToolResponse(status=200, body='{"order": "A1", "state": "shipped"}'))
    upstream.queue(tools_reply(call("lookup_order", {"order_id": "A1"}, "call_abc")), Reply(content="It shipped."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "It shipped."}
    assert body["choices"][0]["finish_reason"] == "stop"
    [request] = tool_server.requests
    assert (request.method, request.path, request.query) == ("GET", "/orders", {"order_id": ["A1"]})
    assert len(upstream.received) == 2
    sent = upstream.received[1].body["messages"]
    assert sent[-2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("lookup_order", {"order_id": "A1"}, "call_abc")],
    }
    assert sent[-1]["role"] == "tool"
    assert sent[-1]["tool_call_id"] == "call_abc"
    assert json.loads(sent[-1]["content"]) == {"status": 200, "body": '{"order": "A1", "state": "shipped"}'}
    assert body["usage"] == {"prompt_tokens": 22, "completion_tokens": 14, "total_tokens": 36}


def test_post_tool_receives_the_arguments_as_a_json_body(live, http, setup: Setup, upstream, tool_server, group_tool):
    group_tool("create_ticket", parameters=TICKET_SCHEMA, path="/tickets")
    arguments = {"priority": "high", "title": "Printer on fire ✓"}
    upstream.queue(tools_reply(call("create_ticket", arguments)), Reply(content="Done."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    [request] = tool_server.requests
    assert (request.method, request.path) == ("POST", "/tickets")
    assert request.headers["content-type"] == "application/json"
    assert request.json() == arguments


def test_tool_answering_an_http_error_gives_the_brain_that_status_and_body(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA)
    tool_server.queue(ToolResponse(status=404, body='{"detail": "no such order"}'))
    upstream.queue(tools_reply(call("lookup_order", {"order_id": "Z9"})), Reply(content="No such order."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "No such order."
    [message] = tool_messages(upstream.received[1].body["messages"])
    assert message["tool_call_id"] == "call_1"
    assert json.loads(message["content"]) == {"status": 404, "body": '{"detail": "no such order"}'}
    execution = Execution.objects.get(pk=response.json()["kitemesh"]["execution_id"])
    assert execution.status == Execution.Status.SUCCEEDED
    assert ToolExecution.objects.get(execution=execution).status == ToolExecution.Status.FAILED


def test_several_tool_calls_of_one_round_run_in_parallel(live, http, setup: Setup, upstream, tool_server, group_tool):
    group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA)
    delay = 4.0
    tool_server.queue(*(ToolResponse(body='{"ok": true}', delay=delay) for _ in range(3)))
    calls = [call("lookup_order", {"order_id": f"A{i}"}, f"call_{i}") for i in range(3)]
    upstream.queue(tools_reply(*calls), Reply(content="All three found."))

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(chat, http, setup)
        wait_for(lambda: tool_server.requests, 15, "the first tool call")
        # Run one after the other, the second call would only start after the first one's delay.
        wait_for(lambda: len(tool_server.requests) == 3, delay / 2, "all three calls in flight together")
        response = future.result(timeout=30)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "All three found."
    assert sorted(r.query["order_id"][0] for r in tool_server.requests) == ["A0", "A1", "A2"]
    results = tool_messages(upstream.received[1].body["messages"])
    assert [m["tool_call_id"] for m in results] == ["call_0", "call_1", "call_2"]


def test_each_result_goes_back_under_its_own_tool_call_id_in_the_order_asked(
    live, http, setup: Setup, upstream, tool_server, second_tool_server, group_tool
):
    group_tool("slow_lookup", method="GET", parameters=ORDER_SCHEMA)
    group_tool("fast_lookup", method="GET", parameters=ORDER_SCHEMA, url=f"{second_tool_server.url}/fast")
    tool_server.queue(ToolResponse(body='"slow answer"', delay=0.5))
    second_tool_server.queue(ToolResponse(body='"fast answer"'))
    upstream.queue(
        tools_reply(
            call("slow_lookup", {"order_id": "S"}, "call_slow"), call("fast_lookup", {"order_id": "F"}, "call_fast")
        ),
        Reply(content="Both."),
    )

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    results = tool_messages(upstream.received[1].body["messages"])
    assert [(m["tool_call_id"], json.loads(m["content"])["body"]) for m in results] == [
        ("call_slow", '"slow answer"'),
        ("call_fast", '"fast answer"'),
    ]


# --- What the brain is offered ---------------------------------------------------------------------


def test_brain_is_offered_the_group_tools_in_openai_format(live, http, setup: Setup, upstream, group_tool):
    group_tool("create_ticket", parameters=TICKET_SCHEMA, description="Open a support ticket.")
    group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA, description="Find an order.")

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    [received] = upstream.received
    assert sorted(received.body["tools"], key=lambda t: t["function"]["name"]) == [
        {
            "type": "function",
            "function": {"name": "create_ticket", "description": "Open a support ticket.", "parameters": TICKET_SCHEMA},
        },
        {
            "type": "function",
            "function": {"name": "lookup_order", "description": "Find an order.", "parameters": ORDER_SCHEMA},
        },
    ]


def test_a_group_without_tools_offers_none(live, http, setup: Setup, upstream):
    response = chat(http, setup)

    assert response.status_code == 200, response.text
    assert "tools" not in upstream.received[0].body


def test_token_scoped_to_some_tools_offers_only_those(live, http, setup: Setup, upstream, group_tool):
    group_tool("create_ticket", parameters=TICKET_SCHEMA)
    lookup = group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA)
    _, raw = token_create(team=setup.team, name="lookups-only", tools=[lookup])

    response = chat(http, setup, headers={"Authorization": f"Bearer {raw}"})

    assert response.status_code == 200, response.text
    assert [t["function"]["name"] for t in upstream.received[0].body["tools"]] == ["lookup_order"]


def test_tool_excluded_from_the_token_is_not_offered_and_not_run_when_named(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    ticket = group_tool("create_ticket", parameters=TICKET_SCHEMA)
    group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA)
    setup.token.excluded_tools.add(ticket)
    upstream.queue(tools_reply(call("create_ticket", {"priority": "high"})), Reply(content="I cannot."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    assert [t["function"]["name"] for t in upstream.received[0].body["tools"]] == ["lookup_order"]
    assert tool_server.requests == []
    [message] = tool_messages(upstream.received[1].body["messages"])
    assert message["tool_call_id"] == "call_1"
    assert "create_ticket" in json.loads(message["content"])["error"]


# --- Calls that are not sent -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "expected_in_error"),
    [
        ('{"priority": "urgent"}', "priority"),  # not in the enum
        ('{"title": "no priority"}', "priority"),  # required property missing
        ('{"priority": "high", "extra": 1}', "extra"),  # additionalProperties: false
        ('{"priority": ', "not valid JSON"),
        ('["high"]', "object"),
    ],
    ids=["enum", "required", "additional", "broken-json", "not-an-object"],
)
def test_invalid_arguments_are_not_sent_and_the_brain_is_told_why(
    live, http, setup: Setup, upstream, tool_server, group_tool, arguments, expected_in_error
):
    group_tool("create_ticket", parameters=TICKET_SCHEMA, price=5)
    upstream.queue(tools_reply(call("create_ticket", arguments)), Reply(content="Let me fix that."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Let me fix that."
    assert tool_server.requests == []
    [message] = tool_messages(upstream.received[1].body["messages"])
    assert message["tool_call_id"] == "call_1"
    error = json.loads(message["content"])["error"]
    assert "not sent" in error
    assert expected_in_error in error
    # A call that was not sent is not a tool run: its price is not charged (two model calls of 0.25 each).
    assert response.json()["kitemesh"]["credits_charged"] == math.ceil(2 * model_cost(11, 7))


def test_unknown_tool_name_gets_an_error_tool_message_and_sends_nothing(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("create_ticket", parameters=TICKET_SCHEMA)
    upstream.queue(tools_reply(call("delete_everything", {})), Reply(content="That tool does not exist."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "That tool does not exist."
    assert tool_server.requests == []
    [message] = tool_messages(upstream.received[1].body["messages"])
    assert message["tool_call_id"] == "call_1"
    assert "delete_everything" in json.loads(message["content"])["error"]


def test_tool_on_loopback_is_refused_without_the_allowlist_and_the_brain_is_told(
    live, http, setup: Setup, upstream, tool_server, settings
):
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = []
    tool = Tool.objects.create(team=setup.team, name="lookup_order", method="GET", url=f"{tool_server.url}/orders")
    setup.group.tools.add(tool)
    upstream.queue(tools_reply(call("lookup_order", {})), Reply(content="Blocked."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    assert tool_server.requests == []
    [message] = tool_messages(upstream.received[1].body["messages"])
    assert "loopback" in json.loads(message["content"])["error"]


# --- The loop's bound ------------------------------------------------------------------------------


def test_brain_asking_for_tools_beyond_the_limit_is_stopped_with_502_tool_rounds_exceeded(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    """SPEC/README: up to MAX_TOOL_ROUNDS rounds of tool calls in a row, then 502 tool_rounds_exceeded. The
    round past the limit is refused, not run: its results could never reach the brain."""
    group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA, price=1)
    upstream.queue(*(tools_reply(call("lookup_order", {"order_id": str(i)})) for i in range(MAX_TOOL_ROUNDS + 5)))

    response = chat(http, setup)

    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "tool_rounds_exceeded"
    assert str(MAX_TOOL_ROUNDS) in error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    execution = Execution.objects.get(request_id=error["request_id"])
    assert execution.status == Execution.Status.FAILED
    balance = credits(http, setup)
    assert balance["held"] == 0
    assert balance["balance"] == 1000 - execution.credits_charged
    # MAX_TOOL_ROUNDS rounds ran and the brain saw each one's results; the next request for tools stopped the run.
    assert [r.query["order_id"] for r in tool_server.requests] == [[str(i)] for i in range(MAX_TOOL_ROUNDS)]
    assert len(upstream.received) == MAX_TOOL_ROUNDS + 1


def test_tool_rounds_up_to_the_limit_end_with_the_answer(live, http, setup: Setup, upstream, tool_server, group_tool):
    group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA)
    upstream.queue(
        *(tools_reply(call("lookup_order", {"order_id": str(i)}, f"call_{i}")) for i in range(MAX_TOOL_ROUNDS)),
        Reply(content="Finally."),
    )

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Finally."
    assert len(upstream.received) == MAX_TOOL_ROUNDS + 1
    assert [r.query["order_id"] for r in tool_server.requests] == [[str(i)] for i in range(MAX_TOOL_ROUNDS)]
    results = tool_messages(upstream.received[-1].body["messages"])
    assert [m["tool_call_id"] for m in results] == [f"call_{i}" for i in range(MAX_TOOL_ROUNDS)]


def test_stream_stopped_by_the_round_limit_after_text_ends_with_an_error_event_then_done(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA)
    upstream.queue(
        *(
            Reply(
                chunks=[f"Looking ({i}). "],
                tool_calls=[call("lookup_order", {"order_id": str(i)}, f"call_{i}")],
                finish_reason="tool_calls",
                tool_call_pieces=2,
            )
            for i in range(MAX_TOOL_ROUNDS + 5)
        )
    )
    payload = {"model": setup.model, "messages": [{"role": "user", "content": "Go"}], "stream": True}

    with http.stream("POST", "/v1/chat/completions", json=payload, headers=setup.headers) as response:
        assert response.status_code == 200
        chunks = sse_chunks(response)

    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "Looking (0). " in [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
    error = chunks[-1]["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "tool_rounds_exceeded")
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert credits(http, setup)["held"] == 0


# --- Credits ---------------------------------------------------------------------------------------


def test_tool_prices_are_charged_with_the_model_calls_rounded_up_once(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA, price="0.5")
    group_tool("create_ticket", parameters=TICKET_SCHEMA, price="1.25")
    upstream.queue(
        tools_reply(
            call("lookup_order", {"order_id": "A1"}, "call_1"),
            call("create_ticket", {"priority": "low"}, "call_2"),
            usage={"prompt_tokens": 100, "completion_tokens": 10},
        ),
        Reply(content="Done.", usage={"prompt_tokens": 150, "completion_tokens": 20}),
    )

    completion = sdk(live, setup).chat.completions.create(
        model=setup.model, messages=[{"role": "user", "content": "Go"}]
    )

    # 1.2 + 1.9 model credits + 0.5 + 1.25 tool credits = 4.85 → 5 (rounding each part would give 7).
    expected = math.ceil(model_cost(100, 10) + model_cost(150, 20) + Decimal("0.5") + Decimal("1.25"))
    assert expected == 5
    kitemesh = completion.model_extra["kitemesh"]
    assert kitemesh["credits_charged"] == expected
    assert len(tool_server.requests) == 2
    assert credits(http, setup) == {"object": "credit_balance", "team": "acme", "balance": 1000 - expected, "held": 0}
    charges = LedgerEntry.objects.filter(execution_id=kitemesh["execution_id"], kind=LedgerEntry.Kind.CHARGE)
    assert list(charges.values_list("amount", flat=True)) == [-expected]


# --- Streaming -------------------------------------------------------------------------------------


def test_stream_assembles_tool_calls_sent_in_pieces_runs_them_and_streams_the_answer(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("create_ticket", parameters=TICKET_SCHEMA, price=2)
    group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA)
    ticket = {"priority": "high", "title": "A title long enough to be cut in several fragments"}
    calls = [call("create_ticket", ticket, "call_t"), call("lookup_order", {"order_id": "A-77"}, "call_o")]
    upstream.queue(
        tools_reply(*calls, pieces=4, usage={"prompt_tokens": 100, "completion_tokens": 10}),
        Reply(chunks=["Ticket ", "opened, ", "order found."], usage={"prompt_tokens": 150, "completion_tokens": 20}),
    )
    payload = {
        "model": setup.model,
        "messages": [{"role": "user", "content": "Open a ticket"}],
        "stream": True,
    }

    with http.stream("POST", "/v1/chat/completions", json=payload, headers=setup.headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(response)

    assert upstream.received[0].body["stream"] is True
    assert sorted((r.method, r.path) for r in tool_server.requests) == [
        ("GET", "/lookup_order"),
        ("POST", "/create_ticket"),
    ]
    posted = next(r for r in tool_server.requests if r.method == "POST")
    assert posted.json() == ticket
    assert next(r for r in tool_server.requests if r.method == "GET").query == {"order_id": ["A-77"]}
    sent = upstream.received[1].body["messages"]
    assert sent[-3] == {"role": "assistant", "content": None, "tool_calls": calls}
    assert [m["tool_call_id"] for m in sent[-2:]] == ["call_t", "call_o"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Ticket opened, order found."
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    expected = math.ceil(model_cost(100, 10) + model_cost(150, 20) + 2)
    assert final["kitemesh"]["credits_charged"] == expected
    assert credits(http, setup)["balance"] == 1000 - expected


def test_openai_sdk_stream_gets_the_answer_after_the_tool_round(live, setup: Setup, upstream, tool_server, group_tool):
    group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA)
    upstream.queue(
        tools_reply(call("lookup_order", {"order_id": "A1"}), pieces=3),
        Reply(chunks=["It ", "shipped."]),
    )

    stream = sdk(live, setup).chat.completions.create(
        model=setup.model, messages=[{"role": "user", "content": "Where is A1?"}], stream=True
    )
    chunks = list(stream)

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "It shipped."
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["kitemesh"]["execution_id"]
    assert [r.query for r in tool_server.requests] == [{"order_id": ["A1"]}]
