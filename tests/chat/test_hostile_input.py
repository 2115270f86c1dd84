"""Every run settles, whatever happens (issue 20, bullet 1): input the database or the encoder cannot store
is refused with 400 naming its field before anything is held or called, and a run that fails in an
unexpected way still charges what completed, releases its hold, ends `failed` and frees its request_id.
Through the live server, on the run's database (PostgreSQL in CI)."""

import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from billing.models import Hold
from core.models import CustomModel, Execution, GroupAgent, Step
from tests.chat.test_scripted import make_scripted_setup
from tests.conftest import Setup
from tests.support.helpers import credits, sse_chunks, wait_for
from tests.support.upstream import FakeUpstream, Reply

PATH = "/v1/chat/completions"


def post_raw(http: httpx.Client, setup: Setup, raw: str) -> httpx.Response:
    headers = {**setup.headers, "Content-Type": "application/json"}
    return http.post(PATH, content=raw.encode(), headers=headers)


def body_text(setup: Setup, *, content: str = '"Hi"', extra: str = "") -> str:
    """A completion body written as JSON text, so it can hold what json.dumps would not write."""
    return f'{{"model": "{setup.model}", "messages": [{{"role": "user", "content": {content}}}]{extra}}}'


def assert_nothing_left(http: httpx.Client, setup: Setup) -> None:
    """No credits held, no active hold, no run left running."""
    assert credits(http, setup)["held"] == 0
    assert not Hold.objects.filter(status=Hold.Status.ACTIVE).exists()
    assert not Execution.objects.filter(status=Execution.Status.RUNNING).exists()


def assert_400(response: httpx.Response, param: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    return error


@pytest.fixture
def scripted(live) -> Setup:
    return make_scripted_setup()


# --- Input that cannot be stored or encoded: 400 before anything is held or called ----------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_in_a_message_is_400_naming_it_and_holds_nothing(live, http, scripted: Setup, stream):
    stream_field = ', "stream": true' if stream else ""
    response = post_raw(http, scripted, body_text(scripted, content='"x\\ud800"', extra=stream_field))

    error = assert_400(response, "messages.0.content")
    assert "surrogate" in error["message"]
    assert response.headers["content-type"].startswith("application/json")
    assert not Execution.objects.exists()
    assert_nothing_left(http, scripted)


def test_a_surrogate_pair_is_text_and_is_served(live, http, scripted: Setup):
    response = post_raw(http, scripted, body_text(scripted, content='"smile \\ud83d\\ude00"'))

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Scripted reply: smile \U0001f600"
    assert_nothing_left(http, scripted)


@pytest.mark.parametrize(
    ("value", "param"),
    [
        pytest.param('{"n": NaN}', "metadata.n", id="nan"),
        pytest.param('{"n": Infinity}', "metadata.n", id="infinity"),
        pytest.param('{"n": [1, -Infinity]}', "metadata.n.1", id="minus-infinity-in-a-list"),
        pytest.param('{"n": 1e400}', "metadata.n", id="float-overflowing-to-infinity"),
        pytest.param('{"n": ' + "9" * 5000 + "}", "metadata.n", id="5000-digit-integer"),
        pytest.param('{"n": 9223372036854775808}', "metadata.n", id="2-to-the-63"),
        pytest.param('{"k\\udc00": 1}', "metadata", id="surrogate-in-a-key"),
    ],
)
def test_metadata_the_database_cannot_store_is_400_naming_it(live, http, scripted: Setup, value, param):
    response = post_raw(http, scripted, body_text(scripted, extra=f', "metadata": {value}'))

    assert_400(response, param)
    assert not Execution.objects.exists()
    assert_nothing_left(http, scripted)


def test_the_largest_64_bit_integer_is_stored(live, http, scripted: Setup):
    response = post_raw(http, scripted, body_text(scripted, extra=', "metadata": {"n": 9223372036854775807}'))

    assert response.status_code == 200, response.text
    assert Execution.objects.get().metadata["n"] == 2**63 - 1


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_beyond_the_bound_is_400_and_holds_nothing(live, http, scripted: Setup, field):
    response = post_raw(http, scripted, body_text(scripted, extra=f', "{field}": {10**40}'))

    assert_400(response, field)
    assert_nothing_left(http, scripted)


def test_max_tokens_at_the_bound_whose_worst_case_the_team_cannot_cover_is_402(live, http, scripted: Setup):
    response = post_raw(http, scripted, body_text(scripted, extra=', "max_tokens": 1000000'))

    assert response.status_code == 402, response.text
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert_nothing_left(http, scripted)


def test_a_tool_call_name_that_is_not_a_function_name_is_400(live, http, scripted: Setup):
    call = {"id": "call_1", "type": "function", "function": {"name": "A" * 80, "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    response = http.post(PATH, json={"model": scripted.model, "messages": messages}, headers=scripted.headers)

    assert_400(response, "messages.1.tool_calls.0.function.name")
    assert_nothing_left(http, scripted)


def test_a_request_refused_with_400_does_not_use_up_its_request_id(live, http, scripted: Setup):
    bad = post_raw(
        http, scripted, body_text(scripted, content='"x\\ud800"', extra=', "metadata": {"request_id": "r1"}')
    )
    assert_400(bad, "messages.0.content")

    good = post_raw(http, scripted, body_text(scripted, extra=', "metadata": {"request_id": "r1"}'))

    assert good.status_code == 200, good.text
    assert good.json()["kitemesh"]["request_id"] == "r1"


# --- What the model sends back: a name longer than its column, text that cannot be encoded ----------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_name_longer_than_its_column_from_the_model_settles_the_run(live, http, scripted: Setup, stream):
    name = "A" * 80
    response = http.post(
        PATH,
        json={
            "model": scripted.model,
            "messages": [{"role": "user", "content": f"!tool {name} {{}}"}],
            "stream": stream,
        },
        headers=scripted.headers,
    )

    assert response.status_code == 200, response.text
    if stream:
        final = sse_chunks(response)[-1]
        assert final["choices"][0]["finish_reason"] == "stop"
    else:
        # The name is stored (and told back) as long as its column allows: no tool has a longer one.
        assert f"There is no tool named '{name[:64]}'" in response.json()["choices"][0]["message"]["content"]
    execution = Execution.objects.get()
    assert execution.status == Execution.Status.SUCCEEDED
    [tool_execution] = execution.tool_executions.all()
    assert tool_execution.tool_name == name[:64]
    assert_nothing_left(http, scripted)


def test_a_lone_surrogate_in_the_models_tool_arguments_and_text_settles_the_run(live, http, setup: Setup, upstream):
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "\ud800"}'}}
    upstream.queue(Reply(content=None, finish_reason="tool_calls", tool_calls=[call]), Reply(content="x\udfff y"))

    response = http.post(
        PATH, json={"model": setup.model, "messages": [{"role": "user", "content": "Hi"}]}, headers=setup.headers
    )

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "x\ufffd y"
    [tool_execution] = Execution.objects.get().tool_executions.all()
    assert tool_execution.arguments == '{"q": "\ufffd"}'
    assert Execution.objects.get().status == Execution.Status.SUCCEEDED
    assert_nothing_left(http, setup)


def test_usage_beyond_what_the_database_stores_from_an_upstream_settles_the_run(live, http, setup: Setup, upstream):
    upstream.queue(Reply(content="Hi", usage={"prompt_tokens": 10**30, "completion_tokens": -5}))

    response = http.post(
        PATH, json={"model": setup.model, "messages": [{"role": "user", "content": "Hi"}]}, headers=setup.headers
    )

    assert response.status_code == 200, response.text
    step = Step.objects.get()
    assert step.usage_estimated and step.prompt_tokens < 10**6
    assert_nothing_left(http, setup)


# --- A failure nobody planned for: the run still settles ------------------------------------------------


@pytest.fixture
def agent_upstream() -> FakeUpstream:
    server = FakeUpstream().start()
    yield server
    server.stop()


def synthesis_setup(setup: Setup, agent_upstream: FakeUpstream) -> CustomModel:
    """The group gets one agent on its own upstream, so a test can hold that agent's call open."""
    model = CustomModel.objects.create(
        team=setup.team, name="slow-agent", base_url=agent_upstream.base_url, model="agent-model", output_per_1k=20
    )
    GroupAgent.objects.create(group=setup.group, name="slow", model=model)
    return model


@pytest.mark.parametrize("stream", [False, True])
def test_a_settlement_the_database_refuses_still_settles_the_hold_and_fails_the_run(
    live, http, setup: Setup, upstream: FakeUpstream, agent_upstream: FakeUpstream, stream
):
    """The agent's model is deleted by an operator while the agent answers: its step can no longer be
    stored (foreign key). The run must still charge what completed, release its hold, end `failed`,
    answer 500 (or an error event and [DONE] once streaming) and free its request_id."""
    model = synthesis_setup(setup, agent_upstream)
    agent_upstream.queue(Reply(content="agent answer", delay=1.0, usage={"prompt_tokens": 10, "completion_tokens": 50}))
    upstream.queue(Reply(content="final", usage={"prompt_tokens": 10, "completion_tokens": 10}))
    before = credits(http, setup)["balance"]
    body = {
        "model": setup.model,
        "messages": [{"role": "user", "content": "Hi"}],
        "metadata": {"mode": "synthesis", "request_id": "req_refused"},
        "stream": stream,
    }

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(http.post, PATH, json=body, headers=setup.headers)
        wait_for(lambda: agent_upstream.received, 10, "the agent's call")
        GroupAgent.objects.filter(group=setup.group).delete()
        model.delete()
        response = answer.result()

    if stream:
        assert response.status_code == 200
        error = sse_chunks(response)[-1]["error"]
    else:
        assert response.status_code == 500, response.text
        error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    execution = Execution.objects.get()
    assert execution.status == Execution.Status.FAILED
    assert execution.error["code"] == "internal_error"
    assert not execution.client_request_id  # the request_id can be used again
    # Both model calls completed: brain 10 in x 10/1k + 10 out x 20/1k, agent 50 out x 20/1k.
    assert credits(http, setup)["balance"] == before - math.ceil(0.1 + 0.2 + 1.0)
    assert_nothing_left(http, setup)
