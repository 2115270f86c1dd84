"""A person's conversations with the team's groups (SPEC §8): started, renamed, deleted, and their
messages written. Each function owns its transaction; who may touch a conversation is the selectors' rule
(chat.selectors.conversation_for_user_get), applied by the caller first."""

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from chat.models import Conversation, ConversationMessage
from core.errors import InvalidRequest
from core.models import Execution, Group

TITLE_MAX_LENGTH = Conversation._meta.get_field("title").max_length


def conversation_title(text: str) -> str:
    """A title from a first message: its first line, cut at a word near the column's length."""
    line = " ".join(text.strip().split("\n", 1)[0].split()) or "New chat"
    if len(line) <= TITLE_MAX_LENGTH:
        return line
    return line[: TITLE_MAX_LENGTH - 1].rsplit(" ", 1)[0] + "…"


@transaction.atomic
def conversation_start(*, user: AbstractBaseUser, group: Group, mode: str, first_message: str) -> Conversation:
    """A new conversation of `user` with `group` (the caller checked the user may use it), titled by its
    first message, which it holds."""
    conversation = Conversation.objects.create(
        team_id=group.team_id, user=user, group=group, mode=mode, title=conversation_title(first_message)
    )
    message_add(conversation=conversation, role=ConversationMessage.Role.USER, content=first_message)
    return conversation


def conversation_rename(*, conversation: Conversation, title: str) -> Conversation:
    title = " ".join(title.split())
    if not title:
        raise InvalidRequest("A conversation needs a title.", param="title")
    if len(title) > TITLE_MAX_LENGTH:
        raise InvalidRequest(f"A title has at most {TITLE_MAX_LENGTH} characters.", param="title")
    conversation.title = title
    conversation.save(update_fields=["title"])  # a rename does not move it up the list
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    """The conversation and its messages; its executions and their ledger entries stay (money's record)."""
    conversation.delete()


@transaction.atomic
def turn_messages_write(
    *,
    user: AbstractBaseUser,
    conversation: Conversation | None,
    group: Group,
    mode: str,
    text: str,
    execution: Execution,
) -> Conversation:
    """A turn's message, once its run has started, at the end of `conversation` (None: the first of a new
    one), and the place of its answer, linked to the run: a reload while it works, or after its process
    died, finds the turn and its state."""
    if conversation is None:
        conversation = conversation_start(user=user, group=group, mode=mode, first_message=text)
    else:
        message_add(conversation=conversation, role=ConversationMessage.Role.USER, content=text)
    message_add(conversation=conversation, role=ConversationMessage.Role.ASSISTANT, content="", execution=execution)
    return conversation


def assistant_message_write(*, conversation: Conversation, execution: Execution, content: str, error: str = "") -> None:
    """The turn's answer (or where it stopped, and why), in the message its start kept for it
    (turn_messages_write), which a resumed run completes after its pause."""
    answer = ConversationMessage.objects.filter(conversation=conversation, execution=execution)
    answer.update(content=content, error=error[:500])


@transaction.atomic
def message_add(
    *, conversation: Conversation, role: str, content: str, execution: Execution | None = None
) -> ConversationMessage:
    """A message at the end of the conversation, which moves to the top of its user's list."""
    message = ConversationMessage.objects.create(
        conversation=conversation, role=role, content=content, execution=execution
    )
    Conversation.objects.filter(pk=conversation.pk).update(updated_at=message.created_at)
    return message
