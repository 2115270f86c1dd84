"""Generated hostile bodies against the live server (issue 20): whatever a client posts to the chat
endpoints, the answer is never a 500, a stream always ends with `data: [DONE]`, and once the answer is
in, no credit stays held. The seed is fixed (KITEMESH_HYPOTHESIS_SEED overrides it), so CI runs the
same bodies every time; a failure prints the body that broke it."""

import json
import os
import uuid
from decimal import Decimal

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from core.models import CustomModel, GroupAgent, Team, Tool
from tests.chat.test_scripted import make_scripted_setup
from tests.conftest import Setup

SEED = int(os.environ.get("KITEMESH_HYPOTHESIS_SEED", "20261207"))
EXAMPLES = int(os.environ.get("KITEMESH_HYPOTHESIS_EXAMPLES", "300"))

# Text as hostile as JSON can carry: lone surrogates, NUL, control and astral characters, long runs.
hostile_text = st.one_of(
    st.text(st.characters(codec=None, categories=None), max_size=40),
    st.sampled_from(["\ud800", "x\udfff", "\x00", "!fail", "A" * 80, "\u202e", "\U0001f600", "", " "]),
    st.text(alphabet="ab\ud83d", max_size=8),
)
# A stand-in for a 5,000-digit integer, which Python will neither repr nor json.dumps: encode() writes it.
HUGE_INTEGER = "\x01huge integer\x01"
hostile_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**40, HUGE_INTEGER]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), hostile_numbers, hostile_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(hostile_text, inner, max_size=4)),
    max_leaves=12,
)


def encode(value: object) -> str:
    """JSON text as a hostile client writes it: lone surrogates as \\ud800 escapes, NaN and Infinity
    as bare words, integers of any size."""
    return json.dumps(value, allow_nan=True).replace(json.dumps(HUGE_INTEGER), "9" * 5000)


def tool_line(name: str, arguments: object) -> str:
    return f"!tool {name} {encode(arguments)}"


def message_content() -> st.SearchStrategy:
    directive = st.builds(tool_line, st.sampled_from(["lookup", "A" * 80, "delegate_to_agent", "nope"]), json_values)
    parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": hostile_text}), max_size=3)
    return st.one_of(hostile_text, directive, parts, json_values)


def messages(model_ids: list[str]) -> st.SearchStrategy:
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "user", "system", "assistant", "tool", "robot", 7]),
            "content": message_content(),
        },
        optional={"tool_call_id": hostile_text, "tool_calls": json_values, "name": hostile_text},
    )
    return st.one_of(st.lists(message, min_size=1, max_size=4), json_values)


def bodies(model_ids: list[str]) -> st.SearchStrategy:
    fields = st.fixed_dictionaries(
        {"model": st.one_of(st.sampled_from(model_ids), hostile_text), "messages": messages(model_ids)},
        optional={
            "stream": st.one_of(st.booleans(), json_values),
            "max_tokens": st.one_of(st.integers(min_value=-5, max_value=2**64), hostile_numbers, json_values),
            "max_completion_tokens": hostile_numbers,
            "temperature": hostile_numbers,
            "top_p": hostile_numbers,
            "stop": json_values,
            "seed": hostile_numbers,
            "user": json_values,
            "response_format": json_values,
            "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": json_values}), json_values),
            "metadata": st.one_of(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "mode": st.sampled_from(["auto", "normal", "synthesis", "orchestration", "x", 3]),
                        "request_id": st.one_of(hostile_text, st.sampled_from(["req_same", "r" * 129])),
                        "note": json_values,
                    },
                ),
                json_values,
            ),
            "approval_id": st.one_of(st.just(str(uuid.uuid4())), json_values),
            "approved_tool_execution_ids": json_values,
            "denied_tools": json_values,
        },
    )
    return st.one_of(fields, json_values)


@pytest.fixture
def hostile_setup(live, tool_server, tools_on_loopback) -> Setup:
    """A scripted group with a free tool that needs approval and two agents, so every mode and the
    pause are reachable from a body alone; nothing costs more than the team has, so no run is refused
    for credits before it can go wrong."""
    team = Team.objects.create(name="hostile")
    tool = Tool.objects.create(
        team=team,
        name="lookup",
        method=Tool.Method.POST,
        url=f"{tool_server.url}/lookup",
        parameters={"type": "object", "properties": {"q": {"type": "string"}}},
        requires_approval=True,
        price=Decimal(0),
    )
    setup = make_scripted_setup(tools=(tool,), team=team)
    agent = CustomModel.objects.create(team=setup.team, name="agent", provider="scripted", model="scripted-agent")
    GroupAgent.objects.create(group=setup.group, name="researcher", model=agent, position=0)
    GroupAgent.objects.create(group=setup.group, name="critic", model=agent, position=1)
    return setup


def held(client: httpx.Client, setup: Setup) -> int:
    response = client.get("/v1/credits", headers=setup.headers)
    assert response.status_code == 200, response.text
    return response.json()["held"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/chat/resume"])
def test_no_hostile_body_gets_a_500_or_leaves_credits_held(live, hostile_setup: Setup, path):
    setup = hostile_setup
    model_ids = [setup.model, f"group:{uuid.uuid4()}"]
    client = httpx.Client(base_url=live.url, timeout=30)
    baseline = held(client, setup)

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=bodies(model_ids))
    def post_one(body: object) -> None:
        raw = encode(body).encode()
        with client.stream(
            "POST", path, content=raw, headers={**setup.headers, "Content-Type": "application/json"}
        ) as response:
            text = response.read().decode("utf-8", errors="replace")
        assert response.status_code != 500, text
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            assert text.rstrip().endswith("data: [DONE]"), text[-300:]
        else:
            answer = response.json()
            assert response.status_code == 200 or set(answer) == {"error"}, text
        assert held(client, setup) == baseline, text

    try:
        post_one()
    finally:
        client.close()
