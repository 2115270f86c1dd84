"""Upstream resilience: retries with backoff for failures that never reached the model (before any byte
goes to the client), no retry of a read timeout, and a circuit breaker that fails fast."""

import time
from decimal import Decimal

import httpx
import pytest

from core.models import CustomModel, Execution, GroupFallback
from tests.conftest import Setup
from tests.support.upstream import FakeUpstream, Reply


@pytest.fixture(autouse=True)
def quick_backoff(settings):
    settings.KITEMESH_UPSTREAM_RETRY_BACKOFF = 0.05


def _chat(http: httpx.Client, setup: Setup, **body) -> httpx.Response:
    payload = {"model": setup.model, "messages": [{"role": "user", "content": "Hi"}], **body}
    return http.post("/v1/chat/completions", json=payload, headers=setup.headers)


@pytest.mark.parametrize("refusals", [[503], [429, 502], [504, 503]])
def test_refused_attempts_are_retried_and_the_client_sees_only_the_answer(live, http, setup, upstream, refusals):
    upstream.queue(*[Reply(status=s) for s in refusals], Reply(content="third time lucky"))

    response = _chat(http, setup)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "third time lucky"
    assert len(upstream.received) == len(refusals) + 1


def test_a_stream_is_retried_before_its_first_byte(live, http, setup, upstream):
    upstream.queue(Reply(status=503), Reply(chunks=["Hel", "lo"]))

    response = _chat(http, setup, stream=True)

    assert response.status_code == 200
    assert '"content":"Hel"' in response.text and response.text.endswith("data: [DONE]\n\n")
    assert len(upstream.received) == 2


def test_retries_are_bounded_then_the_client_gets_502(live, http, setup, upstream, settings):
    settings.KITEMESH_UPSTREAM_RETRIES = 2
    upstream.queue(*[Reply(status=503)] * 5)

    response = _chat(http, setup)

    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_error"
    assert len(upstream.received) == 3


def test_a_server_error_or_a_read_timeout_is_not_retried(live, http, setup, upstream):
    setup.brain.timeout_seconds = 0.3
    setup.brain.save(update_fields=["timeout_seconds"])
    upstream.queue(Reply(status=500), Reply(delay=1.0))

    failed = _chat(http, setup)
    timed_out = _chat(http, setup)

    assert (failed.status_code, timed_out.status_code) == (502, 504)
    assert len(upstream.received) == 2  # one attempt each: the model may have run


def test_a_failing_upstream_opens_the_circuit_which_fails_fast_then_closes_after_a_success(
    live, http, setup, upstream, settings
):
    settings.KITEMESH_UPSTREAM_RETRIES = 0
    settings.KITEMESH_CIRCUIT_FAILURES = 2
    settings.KITEMESH_CIRCUIT_COOLDOWN = 0.5
    upstream.queue(Reply(status=500), Reply(status=500), Reply(content="back"))

    first, second = _chat(http, setup), _chat(http, setup)
    fast = _chat(http, setup)
    time.sleep(0.6)
    recovered = _chat(http, setup)

    assert (first.status_code, second.status_code) == (502, 502)
    assert fast.status_code == 502 and fast.json()["error"]["code"] == "upstream_unavailable"
    assert recovered.status_code == 200
    assert len(upstream.received) == 3  # the call refused by the open circuit reached no upstream


@pytest.fixture
def fallback_upstream():
    server = FakeUpstream().start()
    yield server
    server.stop()


def _with_fallback(setup: Setup, fallback_upstream: FakeUpstream) -> CustomModel:
    spare = CustomModel.objects.create(
        team=setup.team,
        name="spare",
        base_url=fallback_upstream.base_url,
        model="spare-model",
        input_per_1k=Decimal(100),
        output_per_1k=Decimal(100),
    )
    GroupFallback.objects.create(group=setup.group, model=spare, position=0)
    return spare


def test_a_fallback_answers_when_the_brain_fails_before_producing_anything(
    live, http, setup, upstream, fallback_upstream, settings
):
    settings.KITEMESH_UPSTREAM_RETRIES = 0
    _with_fallback(setup, fallback_upstream)
    upstream.queue(Reply(status=500))
    fallback_upstream.queue(Reply(content="from the spare", usage={"prompt_tokens": 10, "completion_tokens": 10}))

    response = _chat(http, setup)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "from the spare"
    assert fallback_upstream.received[0].body["model"] == "spare-model"
    steps = list(Execution.objects.get(pk=body["kitemesh"]["execution_id"]).steps.values_list("model_name", "status"))
    assert steps == [("up-model", "failed"), ("spare-model", "succeeded")]
    assert body["kitemesh"]["credits_charged"] == 2  # (10 × 100 + 10 × 100) / 1000 at the spare's prices


def test_no_fallback_once_the_brain_has_streamed_text(live, http, setup, upstream, fallback_upstream):
    _with_fallback(setup, fallback_upstream)
    upstream.queue(Reply(chunks=["partial"], status=200, usage=None))
    setup.brain.timeout_seconds = 0.5
    setup.brain.save(update_fields=["timeout_seconds"])
    upstream.replies[0].chunk_delay = 2.0  # the stream stalls after its first piece: a read timeout

    response = _chat(http, setup, stream=True)

    assert response.status_code == 200
    assert '"content":"partial"' in response.text and '"upstream_timeout"' in response.text
    assert fallback_upstream.received == []
