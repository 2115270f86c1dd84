"""Scope holds everywhere (issue 20, bullet 2): every endpoint that takes the id of a run is walked with a
token of another team, one scoped to another group and one scoped to another tool. Reads answer 404 for
runs outside the token's group scope; a resume is 404 for a run it may not see and 403 for a round with a
tool it may not use — and then nothing is decided and nothing runs."""

import uuid

import httpx
import pytest

from chat.services.tokens import token_create
from core.models import Approval, Group, Tool, ToolExecution
from tests.approvals.test_resume import call, pause, paused_ids
from tests.conftest import Setup, make_setup
from tests.support.upstream import Reply

ORDER = '{"order_id": "A-1"}'


@pytest.fixture
def scoped(live, setup: Setup, group_tool, upstream) -> dict:
    """A paused round of `create_ticket` (needs approval) and `lookup_order` in the group `support`, and
    the tokens to try it with."""
    ticket = group_tool("create_ticket", requires_approval=True)
    lookup = group_tool("lookup_order")
    other_group = Group.objects.create(id=uuid.uuid4(), team=setup.team, name="other", brain=setup.brain)
    other_team = make_setup(upstream, team_name="rival")
    tokens = {
        "another team": other_team.raw_token,
        "another group": token_create(team=setup.team, name="other-group", groups=[other_group])[1],
        "another tool": token_create(team=setup.team, name="other-tool", tools=[lookup])[1],
    }
    return {"ticket": ticket, "lookup": lookup, "tokens": tokens}


def paused_round(http: httpx.Client, setup: Setup, upstream) -> dict:
    return pause(http, setup, upstream, call("create_ticket"), call("lookup_order", ORDER, call_id="call_2"))


def requests(http: httpx.Client, setup: Setup, paused: dict, raw_token: str) -> dict[str, httpx.Response]:
    """Every id-taking endpoint, for the run of `paused`, with `raw_token`."""
    headers = {"Authorization": f"Bearer {raw_token}"}
    kitemesh = paused["kitemesh"]
    [ticket_id] = paused_ids(paused)
    resume = {"model": setup.model, "approval_id": kitemesh["approval_id"]}
    return {
        "approval": http.get(f"/v1/approvals/{kitemesh['approval_id']}", headers=headers),
        "execution": http.get(f"/v1/executions/{kitemesh['execution_id']}", headers=headers),
        "resume approving": http.post(
            "/v1/chat/resume", json={**resume, "approved_tool_execution_ids": [ticket_id]}, headers=headers
        ),
        "resume denying": http.post(
            "/v1/chat/resume", json={**resume, "denied_tools": [{"tool_execution_id": ticket_id}]}, headers=headers
        ),
        "resume deciding nothing": http.post("/v1/chat/resume", json=resume, headers=headers),
    }


# (token, endpoint) → status and error code; what is not listed here is answered as for the run's own token.
EXPECTED = {
    **{
        ("another team", endpoint): (404, code)
        for endpoint, code in [
            ("approval", "approval_not_found"),
            ("execution", "execution_not_found"),
            ("resume approving", "approval_not_found"),
            ("resume denying", "approval_not_found"),
            ("resume deciding nothing", "approval_not_found"),
        ]
    },
    **{
        ("another group", endpoint): (404, code)
        for endpoint, code in [
            ("approval", "approval_not_found"),
            ("execution", "execution_not_found"),
            ("resume approving", "approval_not_found"),
            ("resume denying", "approval_not_found"),
            ("resume deciding nothing", "approval_not_found"),
        ]
    },
    ("another tool", "approval"): (200, None),
    ("another tool", "execution"): (200, None),
    ("another tool", "resume approving"): (403, "permission_denied"),
    ("another tool", "resume denying"): (403, "permission_denied"),
    ("another tool", "resume deciding nothing"): (403, "permission_denied"),
}


@pytest.mark.parametrize("who", ["another team", "another group", "another tool"])
def test_every_id_taking_endpoint_holds_the_tokens_scope(live, http, setup: Setup, upstream, tool_server, scoped, who):
    paused = paused_round(http, setup, upstream)

    answers = requests(http, setup, paused, scoped["tokens"][who])

    for endpoint, response in answers.items():
        status, code = EXPECTED[(who, endpoint)]
        assert response.status_code == status, (endpoint, response.text)
        if code is not None:
            assert response.json()["error"]["code"] == code, (endpoint, response.text)
    # Nothing was decided, nothing ran: the round waits for its own token, as it was.
    approval = Approval.objects.get(pk=paused["kitemesh"]["approval_id"])
    assert approval.status == Approval.Status.PENDING
    assert set(approval.tool_executions.values_list("status", flat=True)) == {
        ToolExecution.Status.PENDING,
        ToolExecution.Status.APPROVED,  # lookup_order needs no approval
    }
    assert tool_server.requests == []
    assert len(upstream.received) == 1  # only the call that paused


def test_the_runs_own_token_still_resumes_after_every_refusal(live, http, setup: Setup, upstream, tool_server, scoped):
    paused = paused_round(http, setup, upstream)
    for raw in scoped["tokens"].values():
        requests(http, setup, paused, raw)
    upstream.queue(Reply(content="Done."))

    resumed = http.post(
        "/v1/chat/resume",
        json={
            "model": setup.model,
            "approval_id": paused["kitemesh"]["approval_id"],
            "approved_tool_execution_ids": paused_ids(paused),
        },
        headers=setup.headers,
    )

    assert resumed.status_code == 200, resumed.text
    assert sorted(r.path for r in tool_server.requests) == ["/create_ticket", "/lookup_order"]


def test_a_token_scoped_to_the_rounds_tools_resumes_it(live, http, setup: Setup, upstream, tool_server, scoped):
    paused = paused_round(http, setup, upstream)
    both = token_create(team=setup.team, name="both-tools", tools=[scoped["ticket"], scoped["lookup"]])[1]
    upstream.queue(Reply(content="Done."))

    resumed = http.post(
        "/v1/chat/resume",
        json={
            "model": setup.model,
            "approval_id": paused["kitemesh"]["approval_id"],
            "approved_tool_execution_ids": paused_ids(paused),
        },
        headers={"Authorization": f"Bearer {both}"},
    )

    assert resumed.status_code == 200, resumed.text
    assert len(tool_server.requests) == 2
    assert Tool.objects.count() == 2
