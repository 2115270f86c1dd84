"""Conversations (SPEC §8), their services and reads: a member's conversation with a group of their team, its
messages in order (encrypted at rest), the list newest-active first with "load more", rename, delete (its
executions stay), and nobody else's conversation found."""

import pytest
from django.contrib.auth.models import User
from django.db import connection

from chat.models import Conversation, ConversationMessage
from chat.selectors import CONVERSATIONS_PAGE, conversation_for_user_get, conversations_for_user_list
from chat.services.conversations import (
    TITLE_MAX_LENGTH,
    conversation_delete,
    conversation_rename,
    conversation_start,
    conversation_title,
    message_add,
)
from core.errors import InvalidRequest, NotFound
from core.models import Execution
from tests.conftest import Setup

Role = ConversationMessage.Role


def member(setup: Setup, name: str = "ann") -> User:
    user = User.objects.create_user(name, password=f"pw-{name}-123456")
    setup.team.members.add(user)
    return user


def test_a_conversation_starts_with_its_first_message_and_is_titled_by_it(setup: Setup):
    ann = member(setup)

    conversation = conversation_start(
        user=ann, group=setup.group, mode="synthesis", first_message="Is the moon made of cheese?\nBe brief."
    )

    assert (conversation.team, conversation.group, conversation.mode) == (setup.team, setup.group, "synthesis")
    assert conversation.title == "Is the moon made of cheese?"
    [first] = conversation.messages.all()
    assert (first.role, first.content) == ("user", "Is the moon made of cheese?\nBe brief.")


def test_messages_are_kept_in_order_encrypted_and_an_answer_links_its_execution(setup: Setup):
    ann = member(setup)
    conversation = conversation_start(user=ann, group=setup.group, mode="", first_message="secret plan: zebra")
    execution = Execution.objects.create(team=setup.team, group=setup.group, user=ann, request_id="req_c1")

    message_add(conversation=conversation, role=Role.ASSISTANT, content="Noted.", execution=execution)

    found = conversation_for_user_get(user=ann, conversation_id=conversation.id)
    assert [(m.role, m.content, m.execution_id) for m in found.messages.all()] == [
        ("user", "secret plan: zebra", None),
        ("assistant", "Noted.", execution.id),
    ]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT content FROM {ConversationMessage._meta.db_table}")
        stored = [row[0] for row in cursor.fetchall()]
    assert all("zebra" not in text and "Noted" not in text for text in stored)


def test_the_list_is_newest_active_first_and_loads_more(setup: Setup):
    ann = member(setup)
    conversations = [
        conversation_start(user=ann, group=setup.group, mode="", first_message=f"chat {i}")
        for i in range(CONVERSATIONS_PAGE + 3)
    ]
    message_add(conversation=conversations[0], role=Role.USER, content="the oldest, active again")

    first, more = conversations_for_user_list(user=ann)

    assert more is True and len(first) == CONVERSATIONS_PAGE
    assert first[0].pk == conversations[0].pk
    rest, more = conversations_for_user_list(user=ann, before=first[-1].updated_at)
    assert more is False
    assert {c.pk for c in first} | {c.pk for c in rest} == {c.pk for c in conversations}
    assert not {c.pk for c in first} & {c.pk for c in rest}


def test_nobody_else_finds_a_conversation(setup: Setup, upstream):
    ann, bob = member(setup, "ann"), member(setup, "bob")
    conversation = conversation_start(user=ann, group=setup.group, mode="", first_message="mine")

    with pytest.raises(NotFound):
        conversation_for_user_get(user=bob, conversation_id=conversation.id)  # same team, not theirs
    setup.team.members.remove(ann)
    with pytest.raises(NotFound):
        conversation_for_user_get(user=ann, conversation_id=conversation.id)  # no longer in the team
    assert conversations_for_user_list(user=bob) == ([], False)


def test_rename_checks_the_title_and_keeps_the_order(setup: Setup):
    ann = member(setup)
    conversation = conversation_start(user=ann, group=setup.group, mode="", first_message="hello")
    updated = Conversation.objects.get(pk=conversation.pk).updated_at

    conversation_rename(conversation=conversation, title="  Moon   questions ")

    renamed = Conversation.objects.get(pk=conversation.pk)
    assert (renamed.title, renamed.updated_at) == ("Moon questions", updated)
    for bad in ("   ", "x" * (TITLE_MAX_LENGTH + 1)):
        with pytest.raises(InvalidRequest) as caught:
            conversation_rename(conversation=conversation, title=bad)
        assert caught.value.param == "title"


def test_delete_removes_the_messages_and_keeps_the_executions(setup: Setup):
    ann = member(setup)
    conversation = conversation_start(user=ann, group=setup.group, mode="", first_message="bye")
    execution = Execution.objects.create(team=setup.team, group=setup.group, user=ann, request_id="req_c2")
    message_add(conversation=conversation, role=Role.ASSISTANT, content="ok", execution=execution)

    conversation_delete(conversation=conversation)

    assert not ConversationMessage.objects.exists()
    assert Execution.objects.get(pk=execution.pk).user == ann


@pytest.mark.parametrize(
    ("text", "title"),
    [
        ("", "New chat"),
        ("   \n  ", "New chat"),
        ("one   two\nthree", "one two"),
        ("word " * 60, ("word " * 40).strip()[: TITLE_MAX_LENGTH - 1].rsplit(" ", 1)[0] + "…"),
    ],
)
def test_titles_come_from_the_first_line(text: str, title: str):
    assert conversation_title(text) == title
    assert len(conversation_title(text)) <= TITLE_MAX_LENGTH
