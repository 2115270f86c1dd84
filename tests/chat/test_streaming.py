"""POST /v1/chat/completions with stream: true (SSE), against a real loopback upstream and the live
server: the event format, relay as produced, errors before and after the first byte, client
disconnects and billing (SPEC §2 "SSE" and §3)."""

import json
import math
import socket
import time
import uuid

import httpx
import openai
import pytest
from django.db import transaction
from django.utils import timezone

from billing.models import CreditAccount, Hold, LedgerEntry
from core.models import Execution, Step
from tests.conftest import UPSTREAM_API_KEY, Setup, make_setup
from tests.support.helpers import credits, wait_for
from tests.support.upstream import Reply

SYSTEM = "You are the acme brain."


def sdk(live, setup: Setup) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=setup.raw_token, max_retries=0)


def body_for(setup: Setup, **body) -> dict:
    return {"model": setup.model, "messages": [{"role": "user", "content": "Hi"}], "stream": True, **body}


def stream_lines(http: httpx.Client, setup: Setup, **body) -> tuple[httpx.Response, list[str]]:
    with http.stream("POST", "/v1/chat/completions", json=body_for(setup, **body), headers=setup.headers) as response:
        lines = list(response.iter_lines())
    return response, lines


def events(lines: list[str]) -> list[str]:
    """The `data:` payloads, after checking that every non-blank line is a `data:` line."""
    for line in lines:
        assert line == "" or line.startswith("data: "), f"unexpected SSE line {line!r}"
    return [line.removeprefix("data: ") for line in lines if line]


def chunks_of(lines: list[str]) -> list[dict]:
    payloads = events(lines)
    assert payloads[-1] == "[DONE]"
    assert payloads.count("[DONE]") == 1
    return [json.loads(p) for p in payloads[:-1]]


def text_of(chunks: list[dict]) -> list[str]:
    return [
        c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")
    ]


# --- The event format ---------------------------------------------------------------------------


def test_stream_is_server_sent_chat_completion_chunks(live, http, setup: Setup, upstream):
    upstream.queue(Reply(chunks=["Hel", "lo, ", "wor", "ld!"]))

    response, lines = stream_lines(http, setup, metadata={"request_id": "req_stream_1"})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["X-Request-ID"] == "req_stream_1"
    chunks = chunks_of(lines)
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1
    assert ids.pop().startswith("chatcmpl_")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == setup.model
        assert isinstance(chunk["created"], int)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert text_of(chunks) == ["Hel", "lo, ", "wor", "ld!"]


def test_final_chunk_carries_finish_reason_and_kitemesh(live, http, setup: Setup, upstream):
    upstream.queue(Reply(chunks=["a", "b"], usage={"prompt_tokens": 11, "completion_tokens": 7}))

    _, lines = stream_lines(http, setup, metadata={"request_id": "req_stream_2"})

    chunks = chunks_of(lines)
    finished = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finished) == 1
    final = finished[0]
    assert final is chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    kitemesh = final["kitemesh"]
    assert kitemesh["request_id"] == "req_stream_2"
    assert kitemesh["credits_charged"] == 1
    execution = Execution.objects.get(id=uuid.UUID(kitemesh["execution_id"]))
    assert execution.status == Execution.Status.SUCCEEDED
    assert execution.stream is True
    assert all("kitemesh" not in c for c in chunks[:-1])


def test_include_usage_adds_a_final_usage_chunk_with_empty_choices(live, http, setup: Setup, upstream):
    upstream.queue(Reply(chunks=["x", "y"], usage={"prompt_tokens": 40, "completion_tokens": 9}))

    _, lines = stream_lines(http, setup, stream_options={"include_usage": True})

    chunks = chunks_of(lines)
    usage_chunks = [c for c in chunks if "usage" in c and c["usage"] is not None]
    assert len(usage_chunks) == 1
    assert usage_chunks[0] is chunks[-1]
    assert usage_chunks[0]["choices"] == []
    assert usage_chunks[0]["usage"] == {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_without_include_usage_no_chunk_has_usage(live, http, setup: Setup, upstream):
    upstream.queue(Reply(chunks=["x", "y"]))

    _, lines = stream_lines(http, setup)

    chunks = chunks_of(lines)
    assert all(c.get("usage") is None for c in chunks)
    assert all(c["choices"] for c in chunks)


def test_upstream_is_asked_to_stream_with_the_same_prompt(live, http, setup: Setup, upstream):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]

    stream_lines(http, setup, messages=messages, temperature=0.5, max_tokens=64)

    body = upstream.received[0].body
    assert body["stream"] is True
    assert body["model"] == "up-model"
    assert body["messages"] == [{"role": "system", "content": SYSTEM}, *messages]
    assert body["temperature"] == 0.5
    assert body["max_tokens"] == 64
    assert upstream.received[0].headers["Authorization"] == f"Bearer {UPSTREAM_API_KEY}"


def test_openai_sdk_reassembles_the_streamed_text(live, setup: Setup, upstream):
    upstream.queue(
        Reply(chunks=["The ", "quick ", "brown ", "fox."], usage={"prompt_tokens": 100, "completion_tokens": 50})
    )

    stream = sdk(live, setup).chat.completions.create(
        model=setup.model,
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The quick brown fox."
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert final.choices[0].finish_reason == "stop"
    assert final.model_extra["kitemesh"]["credits_charged"] == 2
    assert chunks[-1].usage.total_tokens == 150


# --- Relay as produced --------------------------------------------------------------------------


def test_text_reaches_the_client_while_the_upstream_is_still_producing(live, http, setup: Setup, upstream):
    pieces = ["one ", "two ", "three ", "four ", "five"]
    upstream.queue(Reply(chunks=pieces, chunk_delay=0.3))
    arrivals: list[tuple[float, dict]] = []

    with http.stream("POST", "/v1/chat/completions", json=body_for(setup), headers=setup.headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append((time.monotonic(), json.loads(line[6:])))

    text_arrivals = [(t, c) for t, c in arrivals if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert [c["choices"][0]["delta"]["content"] for _, c in text_arrivals] == pieces
    upstream_done = upstream.received[0].finished
    first_text = text_arrivals[0][0]
    # The upstream needs 5 x 0.3 s; the first piece must not wait for the rest.
    assert first_text < upstream_done - 0.9, f"first text {upstream_done - first_text:.2f}s before upstream end"
    assert text_arrivals[-1][0] - first_text >= 0.9, "the pieces arrived together: the stream was buffered"


# --- Errors -------------------------------------------------------------------------------------


def test_upstream_error_before_any_byte_is_a_plain_502(live, http, setup: Setup, upstream):
    upstream.queue(Reply(status=500, error_body={"error": {"message": f"bad key {UPSTREAM_API_KEY}"}}))

    response = http.post("/v1/chat/completions", json=body_for(setup), headers=setup.headers)

    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")
    assert "data:" not in response.text
    error = response.json()["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "upstream_error"
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert UPSTREAM_API_KEY not in response.text
    execution = Execution.objects.get(team=setup.team)
    assert execution.status == Execution.Status.FAILED
    assert credits(http, setup) == {"object": "credit_balance", "team": "acme", "balance": 1000, "held": 0}


def test_unreachable_upstream_in_a_stream_is_a_plain_502(live, http, setup: Setup, upstream):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    setup.brain.base_url = f"http://127.0.0.1:{port}/v1"
    setup.brain.save(update_fields=["base_url"])

    response = http.post("/v1/chat/completions", json=body_for(setup), headers=setup.headers)

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert credits(http, setup)["held"] == 0


def test_upstream_timeout_before_any_byte_is_a_plain_504(live, http, setup: Setup, upstream):
    setup.brain.timeout_seconds = 0.5
    setup.brain.save(update_fields=["timeout_seconds"])
    upstream.queue(Reply(delay=2))

    response = http.post("/v1/chat/completions", json=body_for(setup), headers=setup.headers)

    assert response.status_code == 504
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert response.json()["error"]["type"] == "upstream_error"
    assert credits(http, setup) == {"object": "credit_balance", "team": "acme", "balance": 1000, "held": 0}


def test_error_after_the_stream_started_is_an_error_event_then_done(live, http, setup: Setup, upstream):
    setup.brain.timeout_seconds = 0.5
    setup.brain.save(update_fields=["timeout_seconds"])
    upstream.queue(Reply(chunks=["first ", "never"], chunk_delay=2.0))

    response, lines = stream_lines(http, setup, metadata={"request_id": "req_stream_err"})

    assert response.status_code == 200
    payloads = events(lines)
    assert payloads[-1] == "[DONE]"
    error_event = json.loads(payloads[-2])
    assert error_event["error"]["code"] == "upstream_timeout"
    assert error_event["error"]["type"] == "upstream_error"
    assert error_event["error"]["request_id"] == "req_stream_err"
    assert text_of([json.loads(p) for p in payloads[:-2]]) == ["first "]
    assert credits(http, setup)["held"] == 0
    assert Execution.objects.get(team=setup.team).status == Execution.Status.FAILED


# --- Disconnects --------------------------------------------------------------------------------


def test_client_disconnect_stops_the_upstream_and_bills_what_was_produced(live, http, upstream):
    # One credit per token either way, so the charge counts tokens exactly.
    setup = make_setup(upstream, input_per_1k="1000", output_per_1k="1000")
    pieces = [f"w{i:02d} " for i in range(20)]  # 4 characters each: one estimated token per piece
    upstream.queue(Reply(chunks=pieces, chunk_delay=0.2))
    user_text = "Tell me a long story"
    body = body_for(setup, messages=[{"role": "user", "content": user_text}], max_tokens=100)
    seen_text: list[str] = []

    with http.stream("POST", "/v1/chat/completions", json=body, headers=setup.headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    seen_text.append(chunk["choices"][0]["delta"]["content"])
                    break
    assert seen_text == ["w00 "]

    received = upstream.received[0]
    wait_for(lambda: received.finished, 6, "the upstream call never ended")
    assert received.aborted, "the upstream kept streaming after the client went away"
    assert received.finished - received.started < 20 * 0.2 - 1.5

    execution = wait_for(
        lambda: Execution.objects.exclude(status=Execution.Status.RUNNING).filter(team=setup.team).first(),
        5,
        "the execution was never settled after the disconnect",
    )
    assert execution.status == Execution.Status.CANCELLED
    step = execution.steps.get()
    assert step.status == Step.Status.CANCELLED
    assert step.usage_estimated is True
    prompt_tokens = math.ceil((len(SYSTEM) + len(user_text)) / 4)
    assert step.prompt_tokens == prompt_tokens
    # At least the piece the client saw was produced, and far from all twenty.
    assert 1 <= step.completion_tokens <= 10
    charged = prompt_tokens + step.completion_tokens
    assert execution.credits_charged == charged
    assert credits(http, setup) == {"object": "credit_balance", "team": "acme", "balance": 1000 - charged, "held": 0}
    kinds = sorted(LedgerEntry.objects.filter(execution=execution).values_list("kind", flat=True))
    assert kinds == ["charge", "hold", "release"]
    assert Hold.objects.get(execution=execution).status == Hold.Status.SETTLED


def test_a_client_gone_while_its_execution_is_recorded_gets_it_settled_at_once(live, http, setup, upstream):
    # The credit account is locked (a row lock on PostgreSQL, the write lock on SQLite), so the request
    # waits inside the statement that records its execution and hold, and the client gives up there.
    with transaction.atomic():
        CreditAccount.objects.select_for_update().filter(team=setup.team).update(updated_at=timezone.now())
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json=body_for(setup), headers=setup.headers, timeout=1)
        assert not Execution.objects.filter(team=setup.team).exists()

    execution = wait_for(
        lambda: Execution.objects.filter(team=setup.team).exclude(status=Execution.Status.RUNNING).first(),
        10,
        "the execution recorded after the client left was never settled",
    )
    assert execution.status == Execution.Status.CANCELLED
    assert (execution.credits_charged, upstream.received) == (0, [])
    assert credits(http, setup)["held"] == 0
    kinds = sorted(LedgerEntry.objects.filter(execution=execution).values_list("kind", flat=True))
    assert kinds == ["hold", "release"]
    assert Hold.objects.get(execution=execution).status == Hold.Status.SETTLED


# --- Billing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_tokens", "completion_tokens", "charged"),
    [(11, 7, 1), (100, 50, 2), (1234, 567, 24)],
)
def test_stream_is_charged_for_the_upstream_reported_usage(
    live, http, setup: Setup, upstream, prompt_tokens, completion_tokens, charged
):
    assert math.ceil((prompt_tokens * 10 + completion_tokens * 20) / 1000) == charged
    upstream.queue(
        Reply(chunks=["a", "b", "c"], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})
    )

    _, lines = stream_lines(http, setup, stream_options={"include_usage": True})

    chunks = chunks_of(lines)
    assert chunks[-1]["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    kitemesh = chunks[-2]["kitemesh"]
    assert kitemesh["credits_charged"] == charged
    assert credits(http, setup) == {"object": "credit_balance", "team": "acme", "balance": 1000 - charged, "held": 0}
    execution = Execution.objects.get(id=kitemesh["execution_id"])
    assert execution.credits_charged == charged
    step = execution.steps.get()
    assert step.usage_estimated is False
    assert (step.prompt_tokens, step.completion_tokens) == (prompt_tokens, completion_tokens)
    entries = LedgerEntry.objects.filter(execution=execution)
    assert sorted(e.kind for e in entries) == ["charge", "hold", "release"]
    assert entries.get(kind="charge").amount == -charged


def test_stream_without_upstream_usage_is_charged_on_estimated_tokens(live, http, setup: Setup, upstream):
    pieces = ["abcdefghij", "klmnopqrst", "uvw"]
    upstream.queue(Reply(chunks=pieces, usage=None))

    _, lines = stream_lines(http, setup, stream_options={"include_usage": True})

    chunks = chunks_of(lines)
    prompt_tokens = math.ceil((len(SYSTEM) + len("Hi")) / 4)
    completion_tokens = math.ceil(23 / 4)
    assert chunks[-1]["usage"]["prompt_tokens"] == prompt_tokens
    assert chunks[-1]["usage"]["completion_tokens"] == completion_tokens
    assert chunks[-2]["kitemesh"]["credits_charged"] == math.ceil((prompt_tokens * 10 + completion_tokens * 20) / 1000)
    assert Step.objects.get(execution_id=chunks[-2]["kitemesh"]["execution_id"]).usage_estimated is True


def test_repeated_request_id_replays_the_stream_without_a_second_call(live, http, setup: Setup, upstream):
    upstream.queue(Reply(chunks=["only ", "once"], usage={"prompt_tokens": 1234, "completion_tokens": 567}))
    body = {"metadata": {"request_id": "req_stream_idem"}}

    _, first = stream_lines(http, setup, **body)
    _, second = stream_lines(http, setup, **body)

    first_chunks, second_chunks = chunks_of(first), chunks_of(second)
    assert "".join(text_of(second_chunks)) == "only once"
    assert second_chunks[-1]["kitemesh"]["execution_id"] == first_chunks[-1]["kitemesh"]["execution_id"]
    assert second_chunks[-1]["kitemesh"]["credits_charged"] == 24
    assert len(upstream.received) == 1
    assert credits(http, setup)["balance"] == 1000 - 24
