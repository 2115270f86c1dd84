"""The group operating modes (SPEC §1 "Mode", §2 `metadata.mode`, §3) through the live server, against the
loopback upstream that records which model was called with which messages: synthesis (every agent answers in
parallel, the brain writes the final answer from theirs), orchestration (the brain delegates sub-tasks through
`delegate_to_agent`, round after round, and may pause for approval in between), auto (a recorded, deterministic
choice), per-request overrides, refusals (400, 402), SSE progress chunks, agent failures, exact credits, and
the scripted demo group of config/demo.yaml."""

import io
import json
import math
import re
import time
from collections import Counter
from decimal import Decimal

import httpx
import openai
import pytest
from django.conf import settings as django_settings
from django.core.management import call_command

from billing.ledger import credits_grant
from billing.models import CreditAccount, Hold, LedgerEntry
from chat.engine.agents import AGENT_CONCURRENCY
from chat.services.tokens import token_create
from chat.services.vault import secret_set
from core.models import Approval, CustomModel, Execution, Group, GroupAgent, Step, Team, Tool, ToolExecution
from tests.conftest import Setup, make_setup
from tests.support.helpers import sse_chunks, wait_for
from tests.support.tool_server import ToolResponse
from tests.support.upstream import FakeUpstream, Received, Reply

BRAIN = "up-model"  # the `model` make_setup's brain sends upstream
BRAIN_SYSTEM = "You are the acme brain."
BRAIN_PRICE = (Decimal(10), Decimal(20))  # make_setup's input/output per 1k
RESEARCHER_ROLE = "Find the facts."
CRITIC_SYSTEM = "You are a critic model."
CONVERSATION = [
    {"role": "user", "content": "Is the moon made of cheese?"},
    {"role": "assistant", "content": "Which kind of cheese do you mean?"},
    {"role": "user", "content": "Any kind."},
]
TICKET_SCHEMA = {"type": "object", "properties": {"priority": {"type": "string"}}, "required": ["priority"]}
DELEGATE = "delegate_to_agent"
DEMO_SYNTHESIS_GROUP = "group:00000000-0000-4000-8000-000000000002"


# --- Helpers ---------------------------------------------------------------------------------------


def model_of(agent: str) -> str:
    """The upstream `model` name of an agent made by add_agent."""
    return f"{agent}-model"


def add_agent(
    setup: Setup,
    upstream: FakeUpstream,
    name: str,
    *,
    role: str = "",
    system: str = "",
    price: tuple[str, str] = ("0", "0"),
    group: Group | None = None,
) -> GroupAgent:
    """An agent on its own custom model (upstream model `<name>-model`, its own API key), last in the group."""
    group = group or setup.group
    key = secret_set(team=setup.team, name=f"{name}-key", value=f"sk-{name}-secret")
    model = CustomModel.objects.create(
        team=setup.team,
        name=f"{name}-llm",
        provider=CustomModel.Provider.OPENAI,
        base_url=upstream.base_url,
        model=model_of(name),
        api_key_secret=key,
        system=system,
        input_per_1k=Decimal(price[0]),
        output_per_1k=Decimal(price[1]),
    )
    position = GroupAgent.objects.filter(group=group).count()
    return GroupAgent.objects.create(group=group, name=name, model=model, role=role, position=position)


def set_mode(setup: Setup, mode: str) -> None:
    Group.objects.filter(pk=setup.group.pk).update(mode=mode)


def chat(http: httpx.Client, setup: Setup, messages: list[dict] | None = None, **body) -> httpx.Response:
    payload = {"model": setup.model, "messages": messages or CONVERSATION, **body}
    return http.post("/v1/chat/completions", json=payload, headers=setup.headers)


def sdk(live, setup: Setup) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=setup.raw_token, max_retries=0)


def call(name: str, arguments: dict | str, call_id: str) -> dict:
    arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def delegate(agent: str, task: str, call_id: str) -> dict:
    return call(DELEGATE, {"agent": agent, "task": task}, call_id)


def tools_reply(*calls: dict, usage: dict | None = None) -> Reply:
    return Reply(
        content=None,
        chunks=[],
        tool_calls=list(calls),
        finish_reason="tool_calls",
        usage=usage or {"prompt_tokens": 11, "completion_tokens": 7},
    )


def cost(price: tuple, usage: dict) -> Decimal:
    return (usage["prompt_tokens"] * Decimal(price[0]) + usage["completion_tokens"] * Decimal(price[1])) / 1000


def finished(record: Received) -> float:
    """When the upstream finished answering (it records that just after the last byte)."""
    return wait_for(lambda: record.finished, 5, "the upstream to record the end of its answer")


def stream_chat(http: httpx.Client, setup: Setup, **body) -> list[tuple[float, dict]]:
    """(arrival time, chunk) of every chunk of a streamed completion."""
    payload = {"model": setup.model, "messages": CONVERSATION, "stream": True, **body}
    arrivals = []
    with http.stream("POST", "/v1/chat/completions", json=payload, headers=setup.headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = []
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("data: {"):
                arrivals.append((time.monotonic(), json.loads(line.removeprefix("data: "))))
    assert [line for line in lines if line][-1] == "data: [DONE]"
    return arrivals


def progress_of(chunks: list[dict]) -> list[tuple[str, str]]:
    """(agent or tool, status) of each progress chunk."""
    progress = [c["kitemesh"]["progress"] for c in chunks if "progress" in c.get("kitemesh", {})]
    return [(p.get("agent") or p["tool"], p["status"]) for p in progress]


def is_text(chunk: dict) -> bool:
    return bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))


def note_sections(note: str) -> dict[str, str]:
    """The `### <agent>` sections of a synthesis note: agent name → what follows, up to the next section."""
    parts = re.split(r"^### (.+)$", note, flags=re.MULTILINE)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def agent_calls(upstream: FakeUpstream, *agents: str) -> list[Received]:
    return [r for r in upstream.received if r.body["model"] in {model_of(a) for a in agents}]


def offered_tools(record: Received) -> dict[str, dict]:
    return {t["function"]["name"]: t for t in record.body.get("tools") or ()}


def execution_get(http: httpx.Client, setup: Setup, execution_id: str) -> dict:
    response = http.get(f"/v1/executions/{execution_id}", headers=setup.headers)
    assert response.status_code == 200, response.text
    return response.json()


def model_steps(execution: dict) -> list[tuple[str | None, str, str]]:
    """(agent, model, status) of each model call of an execution."""
    return [(s["agent"], s["model"], s["status"]) for s in execution["steps"] if s["kind"] == "model_call"]


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["X-Request-ID"]
    if param is not None:
        assert error["param"] == param
    return error


def balance(team: Team) -> tuple[int, int]:
    account = CreditAccount.objects.get(team=team)
    return account.balance, account.held


@pytest.fixture
def synthesis_group(setup: Setup, upstream: FakeUpstream) -> Setup:
    """setup's group in synthesis mode with two agents: `researcher` (its role overrides its model's system)
    and `critic` (no role: its model's system applies)."""
    add_agent(setup, upstream, "researcher", role=RESEARCHER_ROLE, system="The researcher model's own system.")
    add_agent(setup, upstream, "critic", system=CRITIC_SYSTEM)
    set_mode(setup, "synthesis")
    return setup


# --- Synthesis -------------------------------------------------------------------------------------


def test_synthesis_sends_each_agent_its_own_instruction_then_the_client_conversation(
    live, http, synthesis_group: Setup, upstream
):
    setup = synthesis_group
    add_agent(setup, upstream, "plain")  # neither role nor model system: the conversation alone
    upstream.queue_for(model_of("researcher"), Reply(content="Research answer."))
    upstream.queue_for(model_of("critic"), Reply(content="Critic answer."))
    upstream.queue_for(model_of("plain"), Reply(content="Plain answer."))
    upstream.queue_for(BRAIN, Reply(content="Final answer."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    calls = {r.body["model"]: r for r in agent_calls(upstream, "researcher", "critic", "plain")}
    assert set(calls) == {model_of("researcher"), model_of("critic"), model_of("plain")}
    assert calls[model_of("researcher")].body["messages"] == [
        {"role": "system", "content": RESEARCHER_ROLE},
        *CONVERSATION,
    ]
    assert calls[model_of("critic")].body["messages"] == [{"role": "system", "content": CRITIC_SYSTEM}, *CONVERSATION]
    assert calls[model_of("plain")].body["messages"] == CONVERSATION
    for name in ("researcher", "critic", "plain"):
        record = calls[model_of(name)]
        assert record.headers["Authorization"] == f"Bearer sk-{name}-secret"  # each agent's own model key
        assert record.path == "/v1/chat/completions"


def test_synthesis_brain_is_called_last_with_one_note_of_the_answers_labelled_by_agent(
    live, http, synthesis_group: Setup, upstream
):
    setup = synthesis_group
    upstream.queue_for(model_of("researcher"), Reply(content="The moon is rock.", delay=0.3))
    upstream.queue_for(model_of("critic"), Reply(content="Cheese claims lack evidence."))
    upstream.queue_for(BRAIN, Reply(content="No: the moon is rock."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "No: the moon is rock."}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["kitemesh"]["mode"] == "synthesis"
    assert [r.body["model"] for r in upstream.received][-1] == BRAIN
    assert len(upstream.received) == 3
    [brain] = upstream.received_for(BRAIN)
    # Called after every agent was (its note below holds their answers, so it came after they answered; the
    # fake upstream stamps `finished` after its last write, which the gateway may read before it).
    assert brain.started >= max(r.started for r in agent_calls(upstream, "researcher", "critic"))
    messages = brain.body["messages"]
    assert messages[: len(CONVERSATION) + 1] == [{"role": "system", "content": BRAIN_SYSTEM}, *CONVERSATION]
    [note] = messages[len(CONVERSATION) + 1 :]
    assert note["role"] == "system"
    assert note_sections(note["content"]) == {
        "researcher": "The moon is rock.",
        "critic": "Cheese claims lack evidence.",
    }
    # Labelled in the group's agent order, whichever answered first.
    assert note["content"].index("### researcher") < note["content"].index("### critic")


def test_synthesis_agents_answer_in_parallel(live, http, setup: Setup, upstream):
    delay = 1.0
    names = ["a1", "a2", "a3"]
    for name in names:
        add_agent(setup, upstream, name)
        upstream.queue_for(model_of(name), Reply(content=f"{name} answer.", delay=delay))
    set_mode(setup, "synthesis")

    started = time.monotonic()
    response = chat(http, setup)
    elapsed = time.monotonic() - started

    assert response.status_code == 200, response.text
    calls = agent_calls(upstream, *names)
    assert len(calls) == 3
    starts = sorted(r.started for r in calls)
    # One after the other, each would start a full delay after the previous one.
    assert starts[-1] - starts[0] < delay / 2, f"agents started {starts[-1] - starts[0]:.2f}s apart"
    assert elapsed < 2 * delay, f"{len(names)} agents of {delay}s each took {elapsed:.2f}s"


def test_synthesis_runs_at_most_the_concurrency_bound_of_agents_at_once(live, http, setup: Setup, upstream):
    delay = 0.8
    names = [f"agent{i}" for i in range(AGENT_CONCURRENCY + 1)]
    for name in names:
        add_agent(setup, upstream, name)
        upstream.queue_for(model_of(name), Reply(content=f"{name} answer.", delay=delay))
    set_mode(setup, "synthesis")

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    starts = sorted(r.started for r in agent_calls(upstream, *names))
    assert len(starts) == AGENT_CONCURRENCY + 1
    assert starts[AGENT_CONCURRENCY - 1] - starts[0] < delay / 2, "the first agents did not start together"
    assert starts[AGENT_CONCURRENCY] - starts[0] >= delay * 0.9, "one agent more than the bound ran at once"
    sections = note_sections(upstream.received_for(BRAIN)[0].body["messages"][-1]["content"])
    assert sections == {name: f"{name} answer." for name in names}


def test_synthesis_records_every_call_as_a_step_and_charges_their_exact_sum_once(live, http, setup: Setup, upstream):
    researcher_price, critic_price = ("3", "5"), ("7", "11")
    add_agent(setup, upstream, "researcher", role=RESEARCHER_ROLE, price=researcher_price)
    add_agent(setup, upstream, "critic", system=CRITIC_SYSTEM, price=critic_price)
    set_mode(setup, "synthesis")
    usages = {
        "researcher": {"prompt_tokens": 101, "completion_tokens": 33},
        "critic": {"prompt_tokens": 57, "completion_tokens": 19},
        "brain": {"prompt_tokens": 200, "completion_tokens": 30},
    }
    upstream.queue_for(model_of("researcher"), Reply(content="R.", usage=usages["researcher"], delay=0.3))
    upstream.queue_for(model_of("critic"), Reply(content="C.", usage=usages["critic"]))
    upstream.queue_for(BRAIN, Reply(content="Final.", usage=usages["brain"]))
    before = balance(setup.team)

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"] == {"prompt_tokens": 358, "completion_tokens": 82, "total_tokens": 440}
    exact = (
        cost(researcher_price, usages["researcher"])
        + cost(critic_price, usages["critic"])
        + cost(BRAIN_PRICE, usages["brain"])
    )
    assert exact == Decimal("3.676")  # rounded per call it would be 1 + 1 + 3
    assert body["kitemesh"]["credits_charged"] == math.ceil(exact) == 4
    assert balance(setup.team) == (before[0] - 4, 0)
    assert not Hold.objects.filter(status=Hold.Status.ACTIVE).exists()

    execution = execution_get(http, setup, body["kitemesh"]["execution_id"])
    assert execution["mode"] == "synthesis"
    assert execution["status"] == "succeeded"
    assert execution["credits_charged"] == 4
    assert execution["usage"] == body["usage"]
    steps = {s["agent"]: s for s in execution["steps"]}
    assert len(execution["steps"]) == 3
    assert execution["steps"][-1]["agent"] is None  # the brain, last
    for agent in ("researcher", "critic"):
        step = steps[agent]
        assert (step["kind"], step["model"], step["status"]) == ("model_call", model_of(agent), "succeeded")
        assert (step["prompt_tokens"], step["completion_tokens"]) == tuple(usages[agent].values())
    assert (steps[None]["model"], steps[None]["prompt_tokens"], steps[None]["completion_tokens"]) == (BRAIN, 200, 30)
    assert steps["researcher"]["latency_ms"] >= 300
    stored = Step.objects.filter(execution_id=body["kitemesh"]["execution_id"])
    assert sum(s.cost for s in stored) == exact


def test_synthesis_stream_reports_agent_progress_then_streams_the_brain_answer_as_produced(
    live, http, synthesis_group: Setup, upstream
):
    setup = synthesis_group
    pieces = ["The ", "moon ", "is ", "rock."]
    usages = [{"prompt_tokens": 5, "completion_tokens": 3}, {"prompt_tokens": 7, "completion_tokens": 2}]
    upstream.queue_for(model_of("researcher"), Reply(content="R.", delay=0.5, usage=usages[0]))
    upstream.queue_for(model_of("critic"), Reply(content="C.", delay=1.2, usage=usages[1]))
    upstream.queue_for(
        BRAIN, Reply(chunks=pieces, chunk_delay=0.3, usage={"prompt_tokens": 40, "completion_tokens": 9})
    )

    arrivals = stream_chat(http, setup, stream_options={"include_usage": True})

    chunks = [c for _, c in arrivals]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == setup.model for c in chunks)
    progress = progress_of(chunks)
    assert Counter(progress) == Counter(
        {("researcher", "started"): 1, ("researcher", "done"): 1, ("critic", "started"): 1, ("critic", "done"): 1}
    )
    for agent in ("researcher", "critic"):
        assert progress.index((agent, "started")) < progress.index((agent, "done"))
    progress_chunks = [c for c in chunks if "progress" in c.get("kitemesh", {})]
    for chunk in progress_chunks:
        assert chunk["choices"] == [{"index": 0, "delta": {}, "finish_reason": None}]
    # Progress is live: the agents are shown started while they work, and one shown done while the other works.
    arrived = {
        (c["kitemesh"]["progress"]["agent"], c["kitemesh"]["progress"]["status"]): t
        for t, c in arrivals
        if "progress" in c.get("kitemesh", {})
    }
    [researcher] = upstream.received_for(model_of("researcher"))
    [critic] = upstream.received_for(model_of("critic"))
    assert arrived[("critic", "started")] < finished(researcher) - 0.2, "'started' came only after the agents worked"
    assert arrived[("researcher", "done")] < finished(critic) - 0.3, "'done' waited for the slower agent"

    final, usage_chunk = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert {c["kitemesh"]["execution_id"] for c in progress_chunks} == {final["kitemesh"]["execution_id"]}
    assert final["kitemesh"]["mode"] == "synthesis"
    assert isinstance(final["kitemesh"]["credits_charged"], int)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 52, "completion_tokens": 14, "total_tokens": 66}

    text = [(t, c) for t, c in arrivals if is_text(c)]
    assert [c["choices"][0]["delta"]["content"] for _, c in text] == pieces
    last_progress = max(i for i, c in enumerate(chunks) if "progress" in c.get("kitemesh", {}))
    first_text = next(i for i, c in enumerate(chunks) if is_text(c))
    assert last_progress < first_text, "progress came after the brain's text"
    [brain] = upstream.received_for(BRAIN)
    assert brain.body["stream"] is True
    # The brain needs 4 x 0.3 s; its first piece must reach the client before it is done.
    assert text[0][0] < finished(brain) - 0.6, "the brain's answer was buffered"
    assert text[-1][0] - text[0][0] >= 0.6, "the pieces arrived together: the stream was buffered"


def test_openai_sdk_parses_the_synthesis_stream_and_its_progress_chunks(live, synthesis_group: Setup, upstream):
    setup = synthesis_group
    upstream.queue_for(model_of("researcher"), Reply(content="R."))
    upstream.queue_for(model_of("critic"), Reply(content="C."))
    upstream.queue_for(BRAIN, Reply(chunks=["Final ", "answer."]))

    stream = sdk(live, setup).chat.completions.create(model=setup.model, messages=CONVERSATION, stream=True)
    text, progress, finish_reasons = [], [], []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        kitemesh = (chunk.model_extra or {}).get("kitemesh") or {}
        if "progress" in kitemesh:
            progress.append((kitemesh["progress"]["agent"], kitemesh["progress"]["status"]))
            assert chunk.choices[0].delta.content is None
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish_reasons.append(choice.finish_reason)

    assert "".join(text) == "Final answer."
    assert sorted(progress) == [
        ("critic", "done"),
        ("critic", "started"),
        ("researcher", "done"),
        ("researcher", "started"),
    ]
    assert finish_reasons[-1] == "stop"


def test_failed_agent_is_named_in_the_note_and_the_others_answers_still_reach_the_brain(
    live, http, synthesis_group: Setup, upstream
):
    setup = synthesis_group
    upstream.queue_for(model_of("researcher"), Reply(content="Research answer.", delay=0.3))
    upstream.queue_for(model_of("critic"), Reply(status=500))
    upstream.queue_for(BRAIN, Reply(content="Answer from the research alone."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "Answer from the research alone."
    [brain] = upstream.received_for(BRAIN)
    sections = note_sections(brain.body["messages"][-1]["content"])
    assert sections["researcher"] == "Research answer."
    assert "failed" in sections["critic"]
    assert "HTTP 500" in sections["critic"]
    execution = Execution.objects.get(pk=body["kitemesh"]["execution_id"])
    assert execution.status == Execution.Status.SUCCEEDED
    steps = {s.agent: s for s in execution.steps.all()}
    assert steps["critic"].status == Step.Status.FAILED
    assert steps["critic"].model_name == model_of("critic")
    assert "HTTP 500" in steps["critic"].error
    assert steps["researcher"].status == Step.Status.SUCCEEDED
    assert steps[""].status == Step.Status.SUCCEEDED  # the brain
    assert body["usage"] == {"prompt_tokens": 22, "completion_tokens": 14, "total_tokens": 36}


def test_failed_agent_shows_as_failed_progress_in_the_stream(live, http, synthesis_group: Setup, upstream):
    setup = synthesis_group
    upstream.queue_for(model_of("researcher"), Reply(content="Research answer."))
    upstream.queue_for(model_of("critic"), Reply(status=500))
    upstream.queue_for(BRAIN, Reply(chunks=["Still ", "answered."]))

    chunks = [c for _, c in stream_chat(http, setup)]

    assert Counter(progress_of(chunks)) == Counter(
        {("researcher", "started"): 1, ("researcher", "done"): 1, ("critic", "started"): 1, ("critic", "failed"): 1}
    )
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if is_text(c)) == "Still answered."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any("error" in c for c in chunks)


def test_repeated_request_id_replays_a_synthesis_without_calling_any_agent_again(
    live, http, synthesis_group: Setup, upstream
):
    setup = synthesis_group
    upstream.queue_for(BRAIN, Reply(content="Once."))
    metadata = {"request_id": "req_synth_1"}

    first = chat(http, setup, metadata=metadata)
    again = chat(http, setup, metadata=metadata)

    assert first.status_code == again.status_code == 200, again.text
    assert again.json() == first.json()
    assert len(upstream.received) == 3
    assert Execution.objects.count() == 1


def test_synthesis_the_team_cannot_cover_for_all_agents_is_refused_402_before_any_call(live, http, upstream):
    setup = make_setup(upstream, team_name="poor", credits=30)
    add_agent(setup, upstream, "researcher", price=("200", "200"))
    add_agent(setup, upstream, "critic", price=("200", "200"))
    messages = [{"role": "user", "content": "Hello"}]

    # The brain alone fits in 30 credits (worst case 3 at max_tokens 100)...
    alone = chat(http, setup, messages, max_tokens=100, metadata={"mode": "normal"})
    assert alone.status_code == 200, alone.text
    assert [r.body["model"] for r in upstream.received] == [BRAIN]
    before = balance(setup.team)
    executions = Execution.objects.count()

    # ...the agents' worst cases (about 21 each) with it do not.
    refused = chat(http, setup, messages, max_tokens=100, metadata={"mode": "synthesis"})

    assert_error(refused, 402, "insufficient_credits")
    assert [r.body["model"] for r in upstream.received] == [BRAIN]  # nothing more was called
    assert balance(setup.team) == before
    assert Execution.objects.count() == executions


def test_synthesis_the_first_hold_lets_through_is_not_refused_after_its_agents_ran(live, http, upstream):
    """SPEC §3: the worst case is held before any model call, so a 402 comes before anything is called.
    The team below has exactly what the gateway itself holds up front for this request; it must either be
    enough for the whole run (the brain's call, which also reads the agents' answers, included) or be
    refused before any agent runs — never charged for its agents and then refused."""
    prices = {"input_per_1k": "1000", "output_per_1k": "1000"}  # one credit per token: every estimate counts
    body = {"messages": CONVERSATION, "max_tokens": 20, "metadata": {"mode": "synthesis"}}
    reference = make_setup(upstream, team_name="reference", **prices)
    for name in ("researcher", "critic"):
        add_agent(reference, upstream, name, price=("1000", "1000"))
        upstream.queue_for(model_of(name), Reply(content=f"The {name} has a long and careful answer."))
    first = chat(http, reference, **body)
    assert first.status_code == 200, first.text
    held_up_front = (
        LedgerEntry.objects.filter(execution_id=first.json()["kitemesh"]["execution_id"], kind=LedgerEntry.Kind.HOLD)
        .order_by("id")
        .first()
        .amount
    )
    setup = make_setup(upstream, team_name="exact", credits=held_up_front, **prices)
    for name in ("researcher", "critic"):
        agent = GroupAgent.objects.get(group=reference.group, name=name)
        GroupAgent.objects.create(group=setup.group, name=name, model=agent.model, position=agent.position)
        upstream.queue_for(model_of(name), Reply(content=f"The {name} has a long and careful answer."))
    upstream.received.clear()

    response = chat(http, setup, **body)

    if response.status_code == 402:
        assert upstream.received == [], "refused 402 after calling " + ", ".join(
            r.body["model"] for r in upstream.received
        )
        assert balance(setup.team) == (held_up_front, 0)
    else:
        assert response.status_code == 200, response.text
        assert [r.body["model"] for r in upstream.received][-1] == BRAIN


def test_client_disconnect_during_synthesis_stops_the_agents_and_settles_the_run(
    live, http, synthesis_group: Setup, upstream
):
    setup = synthesis_group
    delay = 3.0
    upstream.queue_for(model_of("researcher"), Reply(content="R.", delay=delay))
    upstream.queue_for(model_of("critic"), Reply(content="C.", delay=delay))
    payload = {"model": setup.model, "messages": CONVERSATION, "stream": True}

    with http.stream("POST", "/v1/chat/completions", json=payload, headers=setup.headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"progress"' in line:
                wait_for(lambda: len(upstream.received) == 2, 5, "both agents called")
                break

    execution = wait_for(
        lambda: Execution.objects.exclude(status=Execution.Status.RUNNING).first(), 5, "the run was never settled"
    )
    assert execution.status == Execution.Status.CANCELLED
    for record in agent_calls(upstream, "researcher", "critic"):
        finished(record)
        assert record.aborted, "an agent's call went on after the client left"
    assert upstream.received_for(BRAIN) == []
    steps = wait_for(lambda: list(execution.steps.all()), 5, "the agents' steps")
    assert sorted((s.agent, s.status) for s in steps) == [("critic", "cancelled"), ("researcher", "cancelled")]
    assert balance(setup.team)[1] == 0
    assert not Hold.objects.filter(status=Hold.Status.ACTIVE).exists()


# --- Orchestration ---------------------------------------------------------------------------------


@pytest.fixture
def orchestration_group(setup: Setup, upstream: FakeUpstream) -> Setup:
    add_agent(setup, upstream, "researcher", role=RESEARCHER_ROLE, price=("3", "5"))
    add_agent(setup, upstream, "critic", system=CRITIC_SYSTEM, price=("7", "11"))
    set_mode(setup, "orchestration")
    return setup


def test_orchestration_offers_the_brain_a_delegate_tool_naming_its_agents_beside_the_group_tools(
    live, http, orchestration_group: Setup, upstream, group_tool
):
    setup = orchestration_group
    group_tool("lookup_order", method="GET")
    upstream.queue_for(BRAIN, Reply(content="Nothing to delegate."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Nothing to delegate."
    assert response.json()["kitemesh"]["mode"] == "orchestration"
    [brain] = upstream.received
    assert brain.body["model"] == BRAIN
    assert brain.body["messages"] == [{"role": "system", "content": BRAIN_SYSTEM}, *CONVERSATION]
    tools = offered_tools(brain)
    assert set(tools) == {"lookup_order", DELEGATE}
    spec = tools[DELEGATE]
    assert spec["type"] == "function"
    parameters = spec["function"]["parameters"]
    assert parameters["properties"]["agent"]["enum"] == ["researcher", "critic"]
    assert parameters["properties"]["task"]["type"] == "string"
    assert sorted(parameters["required"]) == ["agent", "task"]
    assert "researcher" in spec["function"]["description"] and "critic" in spec["function"]["description"]


def test_orchestration_runs_delegations_in_parallel_over_several_rounds_then_the_brain_answers(
    live, http, orchestration_group: Setup, upstream
):
    setup = orchestration_group
    delay = 1.0
    round_1 = tools_reply(
        delegate("researcher", "Find the moon's makeup.", "call_r"), delegate("critic", "Check it.", "call_c")
    )
    round_2 = tools_reply(delegate("researcher", "Find a source.", "call_r2"))
    upstream.queue_for(BRAIN, round_1, round_2, Reply(content="The moon is rock (source: NASA)."))
    upstream.queue_for(
        model_of("researcher"), Reply(content="Mostly rock.", delay=delay), Reply(content="NASA says rock.")
    )
    upstream.queue_for(model_of("critic"), Reply(content="Rock holds up.", delay=delay))

    started = time.monotonic()
    response = chat(http, setup)
    elapsed = time.monotonic() - started

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "The moon is rock (source: NASA)."
    models = [r.body["model"] for r in upstream.received]
    assert models[0] == BRAIN
    assert set(models[1:3]) == {model_of("researcher"), model_of("critic")}
    assert models[3:] == [BRAIN, model_of("researcher"), BRAIN]

    first_researcher, second_researcher = upstream.received_for(model_of("researcher"))
    [critic] = upstream.received_for(model_of("critic"))
    assert first_researcher.body["messages"] == [
        {"role": "system", "content": RESEARCHER_ROLE},
        {"role": "user", "content": "Find the moon's makeup."},
    ]
    assert critic.body["messages"] == [
        {"role": "system", "content": CRITIC_SYSTEM},
        {"role": "user", "content": "Check it."},
    ]
    assert second_researcher.body["messages"][-1] == {"role": "user", "content": "Find a source."}
    assert abs(first_researcher.started - critic.started) < delay / 2, "the round's delegations ran one by one"
    assert elapsed < 2 * delay + 1.5

    brain_calls = upstream.received_for(BRAIN)
    assert all(DELEGATE in offered_tools(r) for r in brain_calls)
    head = [{"role": "system", "content": BRAIN_SYSTEM}, *CONVERSATION]
    second = brain_calls[1].body["messages"]
    assert second == [
        *head,
        {"role": "assistant", "content": None, "tool_calls": round_1.tool_calls},
        {"role": "tool", "tool_call_id": "call_r", "content": "Mostly rock."},
        {"role": "tool", "tool_call_id": "call_c", "content": "Rock holds up."},
    ]
    assert brain_calls[2].body["messages"] == [
        *second,
        {"role": "assistant", "content": None, "tool_calls": round_2.tool_calls},
        {"role": "tool", "tool_call_id": "call_r2", "content": "NASA says rock."},
    ]

    # Six calls of 11 prompt and 7 completion tokens each; credits are their exact costs summed, rounded once.
    assert body["usage"] == {"prompt_tokens": 66, "completion_tokens": 42, "total_tokens": 108}
    usage = {"prompt_tokens": 11, "completion_tokens": 7}
    exact = 3 * cost(BRAIN_PRICE, usage) + 2 * cost(("3", "5"), usage) + cost(("7", "11"), usage)
    assert exact == Decimal("1.04")
    assert body["kitemesh"]["credits_charged"] == 2
    execution = execution_get(http, setup, body["kitemesh"]["execution_id"])
    assert execution["mode"] == "orchestration"
    assert Counter(model_steps(execution)) == Counter(
        {
            (None, BRAIN, "succeeded"): 3,
            ("researcher", model_of("researcher"), "succeeded"): 2,
            ("critic", model_of("critic"), "succeeded"): 1,
        }
    )
    delegations = ToolExecution.objects.filter(execution_id=body["kitemesh"]["execution_id"])
    assert sorted((d.tool_name, d.call_id, d.status) for d in delegations) == [
        (DELEGATE, "call_c", "succeeded"),
        (DELEGATE, "call_r", "succeeded"),
        (DELEGATE, "call_r2", "succeeded"),
    ]


def test_delegation_and_a_group_tool_of_one_round_both_run_and_answer_in_the_order_asked(
    live, http, orchestration_group: Setup, upstream, tool_server, group_tool
):
    setup = orchestration_group
    group_tool("lookup_order", method="GET", path="/orders")
    tool_server.queue(ToolResponse(body='{"order": "shipped"}'))
    upstream.queue_for(
        BRAIN,
        tools_reply(call("lookup_order", {}, "call_t"), delegate("critic", "Is shipping late?", "call_d")),
        Reply(content="Shipped, on time."),
    )
    upstream.queue_for(model_of("critic"), Reply(content="Not late."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    assert [r.path for r in tool_server.requests] == ["/orders"]
    results = upstream.received_for(BRAIN)[1].body["messages"][-2:]
    assert [m["tool_call_id"] for m in results] == ["call_t", "call_d"]
    assert json.loads(results[0]["content"]) == {"status": 200, "body": '{"order": "shipped"}'}
    assert results[1]["content"] == "Not late."


@pytest.mark.parametrize(
    ("arguments", "told"),
    [
        ({"agent": "oracle", "task": "Predict."}, "oracle"),
        ({"agent": "researcher"}, "task"),
        ("{not json", "JSON"),
    ],
    ids=["unknown-agent", "no-task", "not-json"],
)
def test_invalid_delegation_gets_an_error_tool_message_and_calls_no_agent(
    live, http, orchestration_group: Setup, upstream, arguments, told
):
    setup = orchestration_group
    upstream.queue_for(BRAIN, tools_reply(call(DELEGATE, arguments, "call_x")), Reply(content="I could not delegate."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "I could not delegate."
    assert [r.body["model"] for r in upstream.received] == [BRAIN, BRAIN]
    message = upstream.received[1].body["messages"][-1]
    assert message["role"] == "tool"
    assert message["tool_call_id"] == "call_x"
    error = json.loads(message["content"])["error"]
    assert told in error
    [delegation] = ToolExecution.objects.filter(execution_id=response.json()["kitemesh"]["execution_id"])
    assert delegation.status == ToolExecution.Status.FAILED


def test_failed_delegation_tells_the_brain_the_agent_failed_and_keeps_the_other_answer(
    live, http, orchestration_group: Setup, upstream
):
    setup = orchestration_group
    upstream.queue_for(
        BRAIN,
        tools_reply(delegate("researcher", "Research.", "call_r"), delegate("critic", "Criticise.", "call_c")),
        Reply(content="Done with what I have."),
    )
    upstream.queue_for(model_of("researcher"), Reply(content="Research answer."))
    upstream.queue_for(model_of("critic"), Reply(status=500))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    results = upstream.received_for(BRAIN)[1].body["messages"][-2:]
    assert results[0] == {"role": "tool", "tool_call_id": "call_r", "content": "Research answer."}
    assert results[1]["tool_call_id"] == "call_c"
    error = json.loads(results[1]["content"])["error"]
    assert "failed" in error and "HTTP 500" in error
    execution = Execution.objects.get(pk=response.json()["kitemesh"]["execution_id"])
    assert execution.status == Execution.Status.SUCCEEDED
    assert Step.objects.get(execution=execution, agent="critic").status == Step.Status.FAILED
    assert Step.objects.get(execution=execution, agent="researcher").status == Step.Status.SUCCEEDED


def test_orchestration_stream_reports_progress_of_the_delegated_agents(
    live, http, orchestration_group: Setup, upstream
):
    setup = orchestration_group
    upstream.queue_for(
        BRAIN,
        tools_reply(delegate("researcher", "Research.", "call_r"), delegate("critic", "Criticise.", "call_c")),
        Reply(chunks=["All ", "done."]),
    )
    upstream.queue_for(model_of("researcher"), Reply(content="R."))
    upstream.queue_for(model_of("critic"), Reply(status=500))

    chunks = [c for _, c in stream_chat(http, setup)]

    assert Counter(progress_of(chunks)) == Counter(
        {("researcher", "started"): 1, ("researcher", "done"): 1, ("critic", "started"): 1, ("critic", "failed"): 1}
    )
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if is_text(c)) == "All done."
    assert chunks[-1]["kitemesh"]["mode"] == "orchestration"


def test_orchestration_pauses_for_approval_mid_round_and_resume_runs_the_delegation_and_the_tool(
    live, http, orchestration_group: Setup, upstream, tool_server, group_tool
):
    setup = orchestration_group
    group_tool("create_ticket", parameters=TICKET_SCHEMA, requires_approval=True, path="/tickets")
    tool_server.queue(ToolResponse(status=201, body='{"ticket": "T-1"}'))
    round_1 = tools_reply(
        delegate("researcher", "Summarise the issue.", "call_d"),
        call("create_ticket", {"priority": "high"}, "call_t"),
    )
    upstream.queue_for(BRAIN, round_1, Reply(content="Ticket T-1 opened with a summary."))
    upstream.queue_for(model_of("researcher"), Reply(content="The printer is on fire."))

    paused = chat(http, setup)

    assert paused.status_code == 200, paused.text
    pause = paused.json()
    assert pause["choices"][0]["finish_reason"] == "tool_calls"
    [waiting] = pause["choices"][0]["message"]["tool_calls"]  # only the call that needs a decision
    assert waiting["function"] == {"name": "create_ticket", "arguments": '{"priority": "high"}'}
    assert pause["kitemesh"]["mode"] == "orchestration"
    assert [r.body["model"] for r in upstream.received] == [BRAIN]
    assert tool_server.requests == []
    assert Execution.objects.get(pk=pause["kitemesh"]["execution_id"]).status == Execution.Status.PAUSED

    resumed = http.post(
        "/v1/chat/resume",
        json={
            "model": setup.model,
            "approval_id": pause["kitemesh"]["approval_id"],
            "approved_tool_execution_ids": [waiting["id"]],
        },
        headers=setup.headers,
    )

    assert resumed.status_code == 200, resumed.text
    answer = resumed.json()
    assert answer["choices"][0]["message"]["content"] == "Ticket T-1 opened with a summary."
    assert answer["kitemesh"]["execution_id"] == pause["kitemesh"]["execution_id"]
    assert answer["kitemesh"]["mode"] == "orchestration"
    [request] = tool_server.requests
    assert (request.method, request.path, request.json()) == ("POST", "/tickets", {"priority": "high"})
    [researcher] = upstream.received_for(model_of("researcher"))
    assert researcher.body["messages"] == [
        {"role": "system", "content": RESEARCHER_ROLE},
        {"role": "user", "content": "Summarise the issue."},
    ]
    assert [r.body["model"] for r in upstream.received] == [BRAIN, model_of("researcher"), BRAIN]
    second = upstream.received_for(BRAIN)[1]
    assert DELEGATE in offered_tools(second) and "create_ticket" in offered_tools(second)
    assert second.body["messages"][-3] == {"role": "assistant", "content": None, "tool_calls": round_1.tool_calls}
    assert second.body["messages"][-2] == {
        "role": "tool",
        "tool_call_id": "call_d",
        "content": "The printer is on fire.",
    }
    assert second.body["messages"][-1]["tool_call_id"] == "call_t"
    assert json.loads(second.body["messages"][-1]["content"]) == {"status": 201, "body": '{"ticket": "T-1"}'}

    execution = execution_get(http, setup, pause["kitemesh"]["execution_id"])
    assert execution["status"] == "succeeded"
    assert execution["mode"] == "orchestration"
    assert Counter(model_steps(execution)) == Counter(
        {(None, BRAIN, "succeeded"): 2, ("researcher", model_of("researcher"), "succeeded"): 1}
    )
    assert [s["tool"] for s in execution["steps"] if s["kind"] == "tool_call"] == ["create_ticket"]
    statuses = dict(
        ToolExecution.objects.filter(execution_id=pause["kitemesh"]["execution_id"]).values_list("call_id", "status")
    )
    assert statuses == {"call_d": "succeeded", "call_t": "succeeded"}


def test_orchestration_resume_denying_the_tool_still_runs_the_delegation_and_tells_the_brain(
    live, http, orchestration_group: Setup, upstream, tool_server, group_tool
):
    setup = orchestration_group
    group_tool("create_ticket", parameters=TICKET_SCHEMA, requires_approval=True)
    upstream.queue_for(
        BRAIN,
        tools_reply(
            delegate("researcher", "Summarise.", "call_d"), call("create_ticket", {"priority": "low"}, "call_t")
        ),
        Reply(content="No ticket, but here is the summary."),
    )
    upstream.queue_for(model_of("researcher"), Reply(content="Summary."))
    pause = chat(http, setup).json()
    [waiting] = pause["choices"][0]["message"]["tool_calls"]

    resumed = http.post(
        "/v1/chat/resume",
        json={
            "model": setup.model,
            "approval_id": pause["kitemesh"]["approval_id"],
            "denied_tools": [{"tool_execution_id": waiting["id"], "reason": "not today"}],
        },
        headers=setup.headers,
    )

    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["choices"][0]["message"]["content"] == "No ticket, but here is the summary."
    assert tool_server.requests == []
    assert len(upstream.received_for(model_of("researcher"))) == 1
    results = upstream.received_for(BRAIN)[1].body["messages"][-2:]
    assert results[0] == {"role": "tool", "tool_call_id": "call_d", "content": "Summary."}
    assert results[1]["tool_call_id"] == "call_t"
    assert "not today" in json.loads(results[1]["content"])["error"]


def test_orchestration_resume_as_a_stream_reports_the_delegation_progress_then_the_answer(
    live, http, orchestration_group: Setup, upstream, tool_server, group_tool
):
    setup = orchestration_group
    group_tool("create_ticket", parameters=TICKET_SCHEMA, requires_approval=True)
    upstream.queue_for(
        BRAIN,
        tools_reply(delegate("critic", "Review.", "call_d"), call("create_ticket", {"priority": "low"}, "call_t")),
        Reply(chunks=["Reviewed ", "and ", "filed."]),
    )
    upstream.queue_for(model_of("critic"), Reply(content="Looks fine."))
    pause = chat(http, setup).json()
    [waiting] = pause["choices"][0]["message"]["tool_calls"]
    payload = {
        "model": setup.model,
        "approval_id": pause["kitemesh"]["approval_id"],
        "approved_tool_execution_ids": [waiting["id"]],
        "stream": True,
    }

    with http.stream("POST", "/v1/chat/resume", json=payload, headers=setup.headers) as response:
        assert response.status_code == 200
        chunks = sse_chunks(response)

    # The delegation's agent, then the approved tool call, each as it starts and ends.
    assert progress_of(chunks) == [
        ("critic", "started"),
        ("critic", "done"),
        ("create_ticket", "running"),
        ("create_ticket", "succeeded"),
    ]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if is_text(c)) == "Reviewed and filed."
    assert chunks[-1]["kitemesh"]["execution_id"] == pause["kitemesh"]["execution_id"]
    assert chunks[-1]["kitemesh"]["mode"] == "orchestration"
    assert len(tool_server.requests) == 1


def test_orchestration_resume_the_team_cannot_cover_is_refused_402_and_the_approval_stays_pending(
    live, http, upstream, tool_server, tools_on_loopback
):
    """A resume holds what its round will cost before running any of it (SPEC §3; README "credits" of
    approvals): the paused round's delegation is part of that round. Refused, the approval stays pending,
    nothing runs, and after a grant the same approval resumes."""
    setup = make_setup(upstream, credits=20)
    add_agent(setup, upstream, "researcher", role=RESEARCHER_ROLE, price=("1000", "1000"))  # worst case ~60 credits
    set_mode(setup, "orchestration")
    tool = Tool.objects.create(
        team=setup.team,
        name="create_ticket",
        url=f"{tool_server.url}/tickets",
        parameters=TICKET_SCHEMA,
        requires_approval=True,
    )
    setup.group.tools.add(tool)
    upstream.queue_for(
        BRAIN,
        tools_reply(
            delegate("researcher", "Summarise.", "call_d"), call("create_ticket", {"priority": "high"}, "call_t")
        ),
        Reply(content="Done."),
    )
    upstream.queue_for(model_of("researcher"), Reply(content="Summary."))
    paused = chat(http, setup, max_tokens=50)
    assert paused.status_code == 200, paused.text
    pause = paused.json()
    [waiting] = pause["choices"][0]["message"]["tool_calls"]
    decision = {
        "model": setup.model,
        "approval_id": pause["kitemesh"]["approval_id"],
        "approved_tool_execution_ids": [waiting["id"]],
    }

    refused = http.post("/v1/chat/resume", json=decision, headers=setup.headers)

    assert_error(refused, 402, "insufficient_credits")
    assert Approval.objects.get(pk=pause["kitemesh"]["approval_id"]).status == Approval.Status.PENDING
    assert tool_server.requests == []
    assert [r.body["model"] for r in upstream.received] == [BRAIN]
    assert balance(setup.team)[1] == 0

    credits_grant(team=setup.team, amount=200, reason="top-up")
    resumed = http.post("/v1/chat/resume", json=decision, headers=setup.headers)

    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["choices"][0]["message"]["content"] == "Done."
    assert len(tool_server.requests) == 1
    assert len(upstream.received_for(model_of("researcher"))) == 1


# --- Auto and per-request modes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agents", "tools", "chosen"),
    [
        (False, False, "normal"),
        (False, True, "normal"),
        (True, False, "synthesis"),
        (True, True, "orchestration"),
    ],
    ids=["nothing", "tools-only", "agents-only", "agents-and-tools"],
)
def test_auto_chooses_the_mode_from_the_group_and_records_it(
    live, http, setup: Setup, upstream, group_tool, agents, tools, chosen
):
    set_mode(setup, "auto")
    if agents:
        add_agent(setup, upstream, "researcher", role=RESEARCHER_ROLE)
    if tools:
        group_tool("lookup_order", method="GET")
    upstream.queue_for(model_of("researcher"), Reply(content="R."))
    upstream.queue_for(BRAIN, Reply(content="Answer."))

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "Answer."
    assert body["kitemesh"]["mode"] == chosen
    execution = Execution.objects.get(pk=body["kitemesh"]["execution_id"])
    assert execution.mode == chosen
    assert execution_get(http, setup, str(execution.id))["mode"] == chosen
    # The choice itself calls no model: only the brain, and the agent when synthesis runs it.
    assert [r.body["model"] for r in upstream.received] == (
        [model_of("researcher"), BRAIN] if chosen == "synthesis" else [BRAIN]
    )
    brain = upstream.received_for(BRAIN)[-1]
    assert (DELEGATE in offered_tools(brain)) == (chosen == "orchestration")
    assert (brain.body["messages"][-1]["role"] == "system") == (chosen == "synthesis")


def test_auto_choice_is_the_same_for_the_same_group(live, http, setup: Setup, upstream):
    set_mode(setup, "auto")
    add_agent(setup, upstream, "researcher")

    modes = [chat(http, setup).json()["kitemesh"]["mode"] for _ in range(3)]

    assert modes == ["synthesis"] * 3


@pytest.mark.parametrize(
    ("group_mode", "requested", "runs"),
    [
        ("synthesis", "normal", "normal"),
        ("normal", "synthesis", "synthesis"),
        ("synthesis", "orchestration", "orchestration"),
        ("orchestration", "auto", "synthesis"),
    ],
)
def test_metadata_mode_overrides_the_group_default(live, http, setup: Setup, upstream, group_mode, requested, runs):
    add_agent(setup, upstream, "researcher", role=RESEARCHER_ROLE)
    set_mode(setup, group_mode)
    upstream.queue_for(model_of("researcher"), Reply(content="R."))
    upstream.queue_for(BRAIN, Reply(content="Answer."))

    response = chat(http, setup, metadata={"mode": requested, "ticket": "T-9"})

    assert response.status_code == 200, response.text
    assert response.json()["kitemesh"]["mode"] == runs
    execution = Execution.objects.get(pk=response.json()["kitemesh"]["execution_id"])
    assert execution.mode == runs
    assert execution.metadata["ticket"] == "T-9"
    brain = upstream.received_for(BRAIN)[-1]
    assert bool(upstream.received_for(model_of("researcher"))) == (runs == "synthesis")
    assert (DELEGATE in offered_tools(brain)) == (runs == "orchestration")


def test_unknown_mode_is_refused_400_on_metadata_mode_before_any_call(live, http, synthesis_group: Setup, upstream):
    response = chat(http, synthesis_group, metadata={"mode": "committee"})

    error = assert_error(response, 400, "invalid_request_error", "metadata.mode")
    assert error["type"] == "invalid_request_error"
    assert upstream.received == []
    assert not Execution.objects.exists()


@pytest.mark.parametrize("mode", ["synthesis", "orchestration"])
def test_agent_mode_on_a_group_without_agents_is_refused_400_before_any_call(live, http, setup: Setup, upstream, mode):
    response = chat(http, setup, metadata={"mode": mode})

    assert_error(response, 400, "invalid_request_error", "metadata.mode")
    assert upstream.received == []
    assert not Execution.objects.exists()
    assert balance(setup.team) == (1000, 0)


# --- The scripted demo -----------------------------------------------------------------------------


def test_demo_synthesis_group_answers_from_both_scripted_agents(live, http):
    call_command("apply_config", str(django_settings.BASE_DIR / "config" / "demo.yaml"), stdout=io.StringIO())
    team = Team.objects.get(name="demo")
    _, raw = token_create(team=team, name="demo-test")
    headers = {"Authorization": f"Bearer {raw}"}
    messages = [{"role": "user", "content": "Hello"}]
    expected = "Synthesis: researcher: Scripted reply: Hello | critic: Scripted reply: Hello"

    response = http.post(
        "/v1/chat/completions", json={"model": DEMO_SYNTHESIS_GROUP, "messages": messages}, headers=headers
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["kitemesh"]["mode"] == "synthesis"
    assert body["kitemesh"]["credits_charged"] >= 1
    steps = Step.objects.filter(execution_id=body["kitemesh"]["execution_id"])
    assert sorted(s.agent for s in steps) == ["", "critic", "researcher"]
    assert all(s.status == Step.Status.SUCCEEDED for s in steps)

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=raw, max_retries=0)
    text, progress = [], []
    for chunk in client.chat.completions.create(model=DEMO_SYNTHESIS_GROUP, messages=messages, stream=True):
        kitemesh = (chunk.model_extra or {}).get("kitemesh") or {}
        if "progress" in kitemesh:
            progress.append((kitemesh["progress"]["agent"], kitemesh["progress"]["status"]))
        text.extend(choice.delta.content or "" for choice in chunk.choices)
    assert "".join(text) == expected
    assert sorted(progress) == [
        ("critic", "done"),
        ("critic", "started"),
        ("researcher", "done"),
        ("researcher", "started"),
    ]


def test_demo_group_delegates_through_the_scripted_brain_in_orchestration(live, http):
    """The scripted brain turns `!tool delegate_to_agent {…}` into a delegation; the scripted agent answers
    the task and the brain reports the tool results."""
    call_command("apply_config", str(django_settings.BASE_DIR / "config" / "demo.yaml"), stdout=io.StringIO())
    _, raw = token_create(team=Team.objects.get(name="demo"), name="demo-test")
    directive = '!tool delegate_to_agent {"agent": "critic", "task": "Check the plan"}'

    response = http.post(
        "/v1/chat/completions",
        json={
            "model": DEMO_SYNTHESIS_GROUP,
            "messages": [{"role": "user", "content": directive}],
            "metadata": {"mode": "orchestration"},
        },
        headers={"Authorization": f"Bearer {raw}"},
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "Tool results: Scripted reply: Check the plan"
    assert body["kitemesh"]["mode"] == "orchestration"
    steps = Step.objects.filter(execution_id=body["kitemesh"]["execution_id"])
    assert sorted(s.agent for s in steps) == ["", "", "critic"]
