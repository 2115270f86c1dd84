"""How many SQL statements one API request runs, counted (not timed) on the live server: the hot
path's budget (README, Benchmarks). A change that adds a statement to every request fails here."""

import httpx
import pytest
from django.db import connection

from tests.approvals.test_resume import approve_all, chat, tools_reply
from tests.conftest import Setup
from tests.support.helpers import sse_chunks
from tests.support.statements import statements_logged
from tests.support.upstream import Reply

# A warm request on SQLite: the execution and its hold, once the configuration is found current (5: the
# configuration version's check, execution, the account reserved and locked in one statement, hold, ledger
# entry); the settlement (5: steps, hold closed, the account charged and released in one statement, release
# and charge entries in one, the execution's outcome). On PostgreSQL each of the two is one statement
# (billing.ledger_postgresql): 2. The token, the team and the group's configuration come from the worker's
# cache (chat.services.config_cache).
WARM_REQUEST = {"sqlite": 10, "postgresql": 2}
# An approval's pause: the start, the approval, its calls, then (on PostgreSQL) one statement that settles
# the model call and one that holds what the tools may cost. Its resume: the configuration's version, the
# approval, then the claim (the approval locked with its execution, the round, the decision, the approval,
# the hold resized in one statement, the execution), the call started, its step and result, the settlement.
APPROVAL_ROUND_TRIP = {"sqlite": (15, 20), "postgresql": (5, 12)}
# The first request reads the configuration version, its token, its team, the version again (the group's
# read checks it too), its group (no agents, tools or fallbacks), the group's brain and the brain's API key.
COLD_READS = 7


def _post(http: httpx.Client, setup: Setup, **body) -> httpx.Response:
    payload = {"model": setup.model, "messages": [{"role": "user", "content": "Hi"}], **body}
    response = http.post("/v1/chat/completions", json=payload, headers=setup.headers)
    assert response.status_code == 200, response.text
    return response


def _summary(statements: list[str]) -> str:
    return "\n".join(s[:90] for s in statements)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_request_runs_a_fixed_number_of_statements(http, setup: Setup, upstream, stream: bool):
    with statements_logged() as cold:
        _post(http, setup, stream=stream)
    with statements_logged() as warm:
        response = _post(http, setup, stream=stream)
    if stream:
        assert sse_chunks(response)[-1]["kitemesh"]["credits_charged"] > 0
    warm_request = WARM_REQUEST[connection.vendor]
    assert len(warm) == warm_request, _summary(warm)
    assert len(cold) == warm_request + COLD_READS, _summary(cold)
    # Nothing is read but the configuration's version: a statement of its own on SQLite, inside the start on
    # PostgreSQL.
    reads = [s for s in warm if s.startswith("SELECT")]
    assert len(reads) == (1 if connection.vendor == "sqlite" else 0), _summary(warm)
    assert all(r.startswith('SELECT 1 FROM "core_configversion" WHERE') for r in reads)


def test_an_approval_round_trip_runs_a_fixed_number_of_statements(
    http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("create_ticket", requires_approval=True, price=3, path="/tickets")
    _post(http, setup)  # the configuration read and kept
    upstream.queue(tools_reply())
    with statements_logged() as pause:
        paused = chat(http, setup).json()
    upstream.queue(Reply(content="Ticket created."))
    with statements_logged() as resume:
        assert approve_all(http, setup, paused).status_code == 200

    assert (len(pause), len(resume)) == APPROVAL_ROUND_TRIP[connection.vendor], _summary(pause + resume)
