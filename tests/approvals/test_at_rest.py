"""What a pause keeps is encrypted at rest (issue 20, "safe by default"): the tool calls' arguments and the
conversation are stored as Fernet tokens under the vault key, so a database dump shows neither; the API
still answers with them, a replay of the pause gives them back, and the resume runs with them."""

import json

from django.db import connection

from core.models import Execution
from tests.approvals.test_resume import call, chat, paused_ids, tools_reply
from tests.conftest import Setup
from tests.support.upstream import Reply

USER_SECRET = "my card is 4111-1111-1111-1111"
ARGUMENT_SECRET = "ship to 221B Baker Street"


def column_values(table: str, column: str) -> list[str]:
    """What the database holds, read around the models' fields."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM {table}")
        return [str(value) for (value,) in cursor.fetchall()]


def test_tool_arguments_and_the_conversation_of_a_pause_are_not_stored_in_clear(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("create_ticket", requires_approval=True)
    arguments = json.dumps({"title": ARGUMENT_SECRET})
    upstream.queue(tools_reply(call(arguments=arguments)))
    body = {"messages": [{"role": "user", "content": USER_SECRET}], "metadata": {"request_id": "req_at_rest"}}

    paused = chat(http, setup, **body)

    assert paused.status_code == 200, paused.text
    assert paused.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == arguments
    stored = (
        column_values("chat_toolexecution", "arguments")
        + column_values("approvals_approval", "state")
        + column_values("chat_execution", "response")
    )
    assert stored and not any(ARGUMENT_SECRET in value or USER_SECRET in value for value in stored)
    assert all(value.startswith("gAAAAA") for value in column_values("chat_toolexecution", "arguments"))

    replayed = chat(http, setup, **body)  # the same request_id and body: the pause, as it was sent
    assert replayed.json()["choices"] == paused.json()["choices"]

    upstream.queue(Reply(content="Ticket open."))
    resumed = http.post(
        "/v1/chat/resume",
        json={
            "model": setup.model,
            "approval_id": paused.json()["kitemesh"]["approval_id"],
            "approved_tool_execution_ids": paused_ids(paused.json()),
        },
        headers=setup.headers,
    )
    assert resumed.status_code == 200, resumed.text
    assert tool_server.requests[0].json() == {"title": ARGUMENT_SECRET}  # decrypted to run
    assert upstream.received[-1].body["messages"][1]["content"] == USER_SECRET  # the conversation came back
    assert Execution.objects.get().status == Execution.Status.SUCCEEDED
