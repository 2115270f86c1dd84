"""POST /v1/chat/completions without streaming, against a real loopback upstream and the live server:
the response shape, what reaches the upstream, credits and the ledger, upstream failures, idempotency
and concurrency (SPEC §2 and §3)."""

import math
import socket
import threading
import time
import uuid

import httpx
import openai
import pytest
from django.conf import settings

from billing.models import CreditAccount, Hold, LedgerEntry
from core.models import Execution, Step
from tests.conftest import UPSTREAM_API_KEY, Setup, make_setup
from tests.support.helpers import credits
from tests.support.upstream import Reply

INPUT_PER_1K = 10
OUTPUT_PER_1K = 20
SYSTEM = "You are the acme brain."


def sdk(live, setup: Setup) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=setup.raw_token, max_retries=0)


def chat(http: httpx.Client, setup: Setup, **body) -> httpx.Response:
    payload = {"model": setup.model, "messages": [{"role": "user", "content": "Hi"}], **body}
    return http.post("/v1/chat/completions", json=payload, headers=setup.headers)


def expected_credits(prompt_tokens: int, completion_tokens: int) -> int:
    return math.ceil((prompt_tokens * INPUT_PER_1K + completion_tokens * OUTPUT_PER_1K) / 1000)


def ledger_kinds(execution_id) -> list[str]:
    return sorted(LedgerEntry.objects.filter(execution_id=execution_id).values_list("kind", flat=True))


def closed_loopback_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def assert_error(response: httpx.Response, status: int, type_: str, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == type_
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error


# --- The success shape --------------------------------------------------------------------------


def test_success_response_has_the_spec_shape(live, setup: Setup, upstream):
    upstream.queue(Reply(content="Bonjour.", usage={"prompt_tokens": 40, "completion_tokens": 9}))
    before = int(time.time())

    raw = sdk(live, setup).chat.completions.with_raw_response.create(
        model=setup.model, messages=[{"role": "user", "content": "Hi"}]
    )
    completion = raw.parse()

    assert completion.id.startswith("chatcmpl_")
    assert completion.object == "chat.completion"
    assert isinstance(completion.created, int)
    assert before - 1 <= completion.created <= time.time() + 1
    assert completion.model == f"group:{setup.group.id}"
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == "Bonjour."
    assert choice.finish_reason == "stop"
    assert completion.usage.prompt_tokens == 40
    assert completion.usage.completion_tokens == 9
    assert completion.usage.total_tokens == 49
    kitemesh = completion.model_extra["kitemesh"]
    assert set(kitemesh) >= {"execution_id", "credits_charged", "request_id"}
    assert uuid.UUID(kitemesh["execution_id"])
    assert kitemesh["credits_charged"] == expected_credits(40, 9)
    assert kitemesh["request_id"].startswith("req_")
    assert raw.headers["X-Request-ID"] == kitemesh["request_id"]


def test_raw_json_body_matches_the_documented_keys(live, http, setup: Setup, upstream):
    response = chat(http, setup)

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "kitemesh"}
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello from upstream."}, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert set(body["kitemesh"]) == {"execution_id", "credits_charged", "request_id", "mode"}
    assert response.headers["X-Request-ID"] == body["kitemesh"]["request_id"]


def test_metadata_request_id_becomes_the_request_id(live, setup: Setup, upstream):
    raw = sdk(live, setup).chat.completions.with_raw_response.create(
        model=setup.model, messages=[{"role": "user", "content": "Hi"}], metadata={"request_id": "req_demo_001"}
    )

    assert raw.parse().model_extra["kitemesh"]["request_id"] == "req_demo_001"
    assert raw.headers["X-Request-ID"] == "req_demo_001"
    assert Execution.objects.get().request_id == "req_demo_001"


def test_generated_request_ids_differ_between_requests(live, http, setup: Setup, upstream):
    first = chat(http, setup).json()["kitemesh"]["request_id"]
    second = chat(http, setup).json()["kitemesh"]["request_id"]

    assert first.startswith("req_")
    assert second.startswith("req_")
    assert first != second


# --- What the upstream receives ------------------------------------------------------------------


def test_brain_system_instruction_comes_first_and_client_messages_follow_unchanged(live, http, setup: Setup, upstream):
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]},
        {"role": "assistant", "content": "Bonjour."},
        {"role": "user", "content": "How are you?"},
    ]

    response = chat(http, setup, messages=messages)

    assert response.status_code == 200, response.text
    assert len(upstream.received) == 1
    sent = upstream.received[0].body["messages"]
    assert sent[0] == {"role": "system", "content": SYSTEM}
    assert sent[1:] == messages


def test_upstream_gets_the_api_key_model_name_and_passthrough_params(live, http, setup: Setup, upstream):
    response = chat(
        http,
        setup,
        temperature=0.3,
        top_p=0.9,
        stop=["END", "STOP"],
        seed=42,
        response_format={"type": "json_object"},
        user="end-user-7",
        max_tokens=77,
        unknown_field="ignored",
    )

    assert response.status_code == 200, response.text
    received = upstream.received[0]
    assert received.path == "/v1/chat/completions"
    assert received.headers["Authorization"] == f"Bearer {UPSTREAM_API_KEY}"
    body = received.body
    assert body["model"] == "up-model"
    assert body["temperature"] == 0.3
    assert body["top_p"] == 0.9
    assert body["stop"] == ["END", "STOP"]
    assert body["seed"] == 42
    assert body["response_format"] == {"type": "json_object"}
    assert body["user"] == "end-user-7"
    assert body["max_tokens"] == 77
    assert "unknown_field" not in body
    assert not body.get("stream")


def test_max_completion_tokens_wins_over_max_tokens(live, http, setup: Setup, upstream):
    response = chat(http, setup, max_tokens=500, max_completion_tokens=33)

    assert response.status_code == 200, response.text
    assert upstream.received[0].body["max_tokens"] == 33


def test_default_output_cap_is_sent_when_the_client_gives_none(live, http, setup: Setup, upstream):
    response = chat(http, setup)

    assert response.status_code == 200, response.text
    body = upstream.received[0].body
    assert body["max_tokens"] == settings.KITEMESH_DEFAULT_MAX_OUTPUT_TOKENS
    for absent in ("temperature", "top_p", "stop", "seed", "response_format", "user"):
        assert absent not in body


# --- Credits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_tokens", "completion_tokens", "charged"),
    [
        (11, 7, 1),  # 0.25 rounds up to 1
        (100, 50, 2),  # exactly 2.0: no rounding up
        (300, 100, 5),  # exactly 5.0: no rounding up
        (1234, 567, 24),  # 23.68
        (2000, 1001, 41),  # 40.02
    ],
)
def test_charge_is_the_rounded_up_price_of_the_reported_usage(
    live, http, setup: Setup, upstream, prompt_tokens, completion_tokens, charged
):
    assert expected_credits(prompt_tokens, completion_tokens) == charged
    upstream.queue(Reply(usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}))
    before = credits(http, setup)

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["kitemesh"]["credits_charged"] == charged
    after = credits(http, setup)
    assert after == {"object": "credit_balance", "team": "acme", "balance": before["balance"] - charged, "held": 0}

    execution_id = body["kitemesh"]["execution_id"]
    entries = {e.kind: e for e in LedgerEntry.objects.filter(execution_id=execution_id)}
    assert ledger_kinds(execution_id) == ["charge", "hold", "release"]
    assert entries["hold"].amount == entries["release"].amount > 0
    assert entries["charge"].amount == -charged
    assert entries["charge"].balance_after == after["balance"]
    assert entries["charge"].held_after == 0
    assert Hold.objects.get(execution_id=execution_id).status == Hold.Status.SETTLED
    execution = Execution.objects.get(id=execution_id)
    assert execution.credits_charged == charged


def test_hold_covers_the_worst_case_while_the_call_runs(live, http, setup: Setup, upstream):
    upstream.queue(Reply(delay=1.0))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(response=chat(http, setup, max_tokens=500)))
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not upstream.received and time.monotonic() < deadline:
            time.sleep(0.02)
        assert upstream.received, "the upstream was never called"
        during = CreditAccount.objects.get(team=setup.team)
        # 500 output tokens at 20 per 1k is 10 credits, plus the prompt: more than 10.
        assert during.held > 10
        assert during.balance == 1000
    finally:
        thread.join(timeout=10)
    assert result["response"].status_code == 200
    assert credits(http, setup)["held"] == 0


def test_execution_row_records_one_succeeded_step(live, http, setup: Setup, upstream):
    upstream.queue(Reply(delay=0.15, usage={"prompt_tokens": 120, "completion_tokens": 84}))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    execution = Execution.objects.get(id=response.json()["kitemesh"]["execution_id"])
    assert execution.status == Execution.Status.SUCCEEDED
    assert execution.team_id == setup.team.id
    assert execution.group_id == setup.group.id
    assert execution.mode == "normal"
    assert execution.prompt_tokens == 120
    assert execution.completion_tokens == 84
    assert execution.finished_at is not None
    steps = list(execution.steps.all())
    assert len(steps) == 1
    step = steps[0]
    assert step.kind == Step.Kind.MODEL_CALL
    assert step.status == Step.Status.SUCCEEDED
    assert step.model_name == "up-model"
    assert step.custom_model_id == setup.brain.id
    assert (step.prompt_tokens, step.completion_tokens) == (120, 84)
    assert step.usage_estimated is False
    assert step.latency_ms >= 150


def test_upstream_without_usage_is_estimated_from_characters(live, http, setup: Setup, upstream):
    content = "x" * 41
    user_text = "Please estimate me, upstream."
    upstream.queue(Reply(content=content, usage=None))

    response = chat(http, setup, messages=[{"role": "user", "content": user_text}])

    assert response.status_code == 200, response.text
    body = response.json()
    prompt_tokens = math.ceil((len(SYSTEM) + len(user_text)) / 4)
    completion_tokens = math.ceil(41 / 4)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    assert body["kitemesh"]["credits_charged"] == expected_credits(prompt_tokens, completion_tokens)
    step = Step.objects.get(execution_id=body["kitemesh"]["execution_id"])
    assert step.usage_estimated is True
    assert (step.prompt_tokens, step.completion_tokens) == (prompt_tokens, completion_tokens)


def test_insufficient_credits_answers_402_and_calls_nothing(live, http, upstream):
    poor = make_setup(upstream, team_name="poor", credits=1)

    response = chat(http, poor, max_tokens=100_000)

    error = assert_error(response, 402, "insufficient_credits", "insufficient_credits")
    assert "request_id" in error
    assert upstream.received == []
    assert credits(http, poor) == {"object": "credit_balance", "team": "poor", "balance": 1, "held": 0}
    assert not LedgerEntry.objects.filter(team=poor.team).exclude(kind="grant").exists()


# --- Upstream failures --------------------------------------------------------------------------


def assert_nothing_charged(http: httpx.Client, setup: Setup, response: httpx.Response) -> None:
    assert credits(http, setup)["balance"] == 1000
    assert credits(http, setup)["held"] == 0
    execution = Execution.objects.get(team=setup.team)
    assert execution.status == Execution.Status.FAILED
    assert execution.credits_charged == 0
    assert execution.request_id == response.headers["X-Request-ID"]
    assert ledger_kinds(execution.id) == ["hold", "release"]
    assert Hold.objects.get(execution=execution).status == Hold.Status.SETTLED
    step = execution.steps.get()
    assert step.status == Step.Status.FAILED


def test_upstream_500_is_a_502_upstream_error_and_charges_nothing(live, http, setup: Setup, upstream):
    upstream.queue(Reply(status=500, error_body={"error": {"message": "model overloaded"}}))

    response = chat(http, setup)

    assert_error(response, 502, "upstream_error", "upstream_error")
    assert len(upstream.received) == 1
    assert_nothing_charged(http, setup, response)


def test_upstream_401_quoting_the_key_does_not_leak_it(live, http, setup: Setup, upstream):
    quoted = {"error": {"message": f"Incorrect API key provided: {UPSTREAM_API_KEY}", "code": "invalid_api_key"}}
    upstream.queue(Reply(status=401, error_body=quoted))

    response = chat(http, setup)

    assert_error(response, 502, "upstream_error", "upstream_error")
    assert UPSTREAM_API_KEY not in response.text
    for name, value in response.headers.items():
        assert UPSTREAM_API_KEY not in name
        assert UPSTREAM_API_KEY not in value
    assert UPSTREAM_API_KEY not in str(Execution.objects.get().error)
    assert_nothing_charged(http, setup, response)


def test_upstream_slower_than_the_model_timeout_is_a_504(live, http, setup: Setup, upstream):
    setup.brain.timeout_seconds = 0.5
    setup.brain.save(update_fields=["timeout_seconds"])
    upstream.queue(Reply(delay=2))

    started = time.monotonic()
    response = chat(http, setup)
    elapsed = time.monotonic() - started

    assert_error(response, 504, "upstream_error", "upstream_timeout")
    assert elapsed < 1.8, f"KiteMesh waited {elapsed:.2f}s for an upstream with a 0.5s timeout"
    assert_nothing_charged(http, setup, response)


def test_unreachable_upstream_is_a_502(live, http, setup: Setup, upstream):
    setup.brain.base_url = f"http://127.0.0.1:{closed_loopback_port()}/v1"
    setup.brain.save(update_fields=["base_url"])

    response = chat(http, setup)

    assert_error(response, 502, "upstream_error", "upstream_error")
    assert upstream.received == []
    assert_nothing_charged(http, setup, response)


def test_sdk_raises_the_upstream_error_status(live, setup: Setup, upstream):
    upstream.queue(Reply(status=500))

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(live, setup).chat.completions.create(model=setup.model, messages=[{"role": "user", "content": "Hi"}])

    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_error"


# --- Idempotency --------------------------------------------------------------------------------


def test_same_request_id_and_body_replays_the_first_result(live, http, setup: Setup, upstream):
    upstream.queue(Reply(content="First answer.", usage={"prompt_tokens": 1234, "completion_tokens": 567}))
    body = {"metadata": {"request_id": "req_idem_1"}, "messages": [{"role": "user", "content": "Once"}]}

    first = chat(http, setup, **body)
    second = chat(http, setup, **body)

    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    assert second.json()["kitemesh"]["execution_id"] == first.json()["kitemesh"]["execution_id"]
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["kitemesh"]["credits_charged"] == first.json()["kitemesh"]["credits_charged"] == 24
    assert second.headers["X-Request-ID"] == "req_idem_1"
    assert len(upstream.received) == 1
    assert LedgerEntry.objects.filter(team=setup.team, kind="charge").count() == 1
    assert Execution.objects.filter(team=setup.team).count() == 1
    assert credits(http, setup) == {"object": "credit_balance", "team": "acme", "balance": 1000 - 24, "held": 0}


def test_a_response_is_stored_only_for_a_clients_request_id(live, http, setup: Setup, upstream):
    # Only a client's request_id is ever replayed, so only its response is kept, with the final charge.
    kept = chat(http, setup, metadata={"request_id": "req_idem_kept"}).json()
    unkept = chat(http, setup).json()

    stored = Execution.objects.get(id=kept["kitemesh"]["execution_id"]).response
    assert stored == kept and stored["kitemesh"]["credits_charged"] > 0
    assert Execution.objects.get(id=unkept["kitemesh"]["execution_id"]).response is None


def test_same_request_id_with_a_different_body_is_a_409(live, http, setup: Setup, upstream):
    first = chat(http, setup, metadata={"request_id": "req_idem_2"}, messages=[{"role": "user", "content": "A"}])
    second = chat(http, setup, metadata={"request_id": "req_idem_2"}, messages=[{"role": "user", "content": "B"}])

    assert first.status_code == 200, first.text
    error = assert_error(second, 409, "conflict_error", "request_id_conflict")
    assert error["request_id"] == "req_idem_2"
    assert len(upstream.received) == 1
    assert LedgerEntry.objects.filter(team=setup.team, kind="charge").count() == 1


def test_request_ids_are_scoped_per_team(live, http, setup: Setup, upstream):
    other = make_setup(upstream, team_name="globex")
    body = {"metadata": {"request_id": "req_shared"}}

    mine = chat(http, setup, **body)
    theirs = chat(http, other, **body)

    assert mine.status_code == 200, mine.text
    assert theirs.status_code == 200, theirs.text
    assert mine.json()["kitemesh"]["execution_id"] != theirs.json()["kitemesh"]["execution_id"]
    assert len(upstream.received) == 2


# --- Concurrency --------------------------------------------------------------------------------


def test_two_slow_requests_run_concurrently(live, http, setup: Setup, upstream):
    upstream.queue(Reply(delay=1.0, content="one"), Reply(delay=1.0, content="two"))
    responses: list[httpx.Response] = []
    barrier = threading.Barrier(2)

    def call() -> None:
        with httpx.Client(base_url=live.url, timeout=30) as client:
            barrier.wait()
            responses.append(chat(client, setup))

    threads = [threading.Thread(target=call) for _ in range(2)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    elapsed = time.monotonic() - started

    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert sorted(r.json()["choices"][0]["message"]["content"] for r in responses) == ["one", "two"]
    assert elapsed < 1.7, f"two 1s upstream calls took {elapsed:.2f}s: they were serialised"
    assert len(upstream.received) == 2
    first, second = upstream.received
    assert max(first.started, second.started) < min(first.finished, second.finished), "upstream calls did not overlap"
    assert credits(http, setup) == {"object": "credit_balance", "team": "acme", "balance": 1000 - 2, "held": 0}
