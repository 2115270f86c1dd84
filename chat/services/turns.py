"""A person's turn in a conversation (SPEC §8): the run POST /v1/chat/completions makes — the same body
validation, rate limits, group and mode rules, holds, charges, tools and approvals (chat.engine) — made by a
member of the conversation's team; its events relayed to the page and its answer written into the
conversation. A turn that pauses for an approval is continued (turn_continue) once it is decided, on the
page or on /approvals/, as POST /v1/chat/resume continues an API client's."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from chat.engine.render import run_relay
from chat.engine.run import Answered, Pause, Progress, Run
from chat.engine.start import run_resume, run_start
from chat.models import Conversation
from chat.services.conversations import assistant_message_write, turn_messages_write
from chat.services.rate_limits import Admitted, stream_release
from chat.wire.requests import chat_request_parse, resume_request_parse
from core.callers import Caller
from core.db import in_db_thread
from core.envelope import request_id_new
from core.errors import KiteMeshError
from core.models import Group

COMPLETED, WAITING, INTERRUPTED = "completed", "waiting", "interrupted"  # how a turn's run ends
STOPPED = "Stopped: the page was closed before the answer ended."


@dataclass
class Turn:
    """A conversation's run, started or continued, and the stream slots it holds until it ends."""

    conversation: Conversation
    run: Run
    slots: list[str]


@dataclass
class TurnEnd:
    """How a turn's run ended: `completed` (its answer in `text`), `waiting` for the approval
    `approval_id`, or `interrupted` by `error`; and what this request was charged."""

    state: str
    credits_charged: int
    text: str = ""
    approval_id: uuid.UUID | None = None
    error: KiteMeshError | None = None


def conversation_history(conversation: Conversation | None) -> list[dict]:
    """What the group is sent of the conversation so far: the messages that hold text (a turn that stopped
    before answering left none), oldest first. `conversation.messages` is prefetched."""
    if conversation is None:
        return []
    return [{"role": m.role, "content": m.content} for m in conversation.messages.all() if m.content]


async def turn_send(
    *, caller: Caller, conversation: Conversation | None, group: Group, mode: str, text: str, stream: bool
) -> Turn:
    """Start the turn of `text` after the conversation so far (None: a new conversation with `group` in
    `mode`, "" for the group's). Every refusal (400, 402, 403, 404, 429) is raised before anything is
    written or held; the message is written once the run has started."""
    messages = [*conversation_history(conversation), {"role": "user", "content": text}]
    body = {"model": f"group:{group.pk}", "messages": messages, "stream": stream}
    if mode:
        body["metadata"] = {"mode": mode}
    request = chat_request_parse(body)
    async with Admitted(caller, stream) as slots:
        run = await run_start(caller=caller, request=request, request_id=request_id_new())
        try:
            conversation = await in_db_thread(
                turn_messages_write,
                user=caller.user,
                conversation=conversation,
                group=group,
                mode=mode,
                text=text,
                execution=run.execution,
            )
        except BaseException as exc:
            await run.stopped(exc)
            raise
    return Turn(conversation=conversation, run=run, slots=slots)


async def turn_continue(*, caller: Caller, conversation: Conversation, approval_id: uuid.UUID, stream: bool) -> Turn:
    """Resume the conversation's run paused at `approval_id` (decided: else 409 `decision_required`)."""
    body = {"model": f"group:{conversation.group_id}", "approval_id": str(approval_id), "stream": stream}
    resume = resume_request_parse(body)
    async with Admitted(caller, stream) as slots:
        run = await run_resume(caller=caller, resume=resume, request_id=request_id_new())
    return Turn(conversation=conversation, run=run, slots=slots)


async def turn_events(turn: Turn) -> AsyncIterator[str | Progress | TurnEnd]:
    """The turn's text deltas and progress as they come, then how it ended, its answer (or where it stopped
    and why) written into the conversation first. A page that leaves stops the run (it is settled for what
    it used) and leaves what it said so far."""
    run, said, end = turn.run, [], None
    try:
        async with contextlib.aclosing(run_relay(run)) as relay:
            async for event in relay:
                if isinstance(event, Answered | Pause):
                    end = _end(event)
                    break
                if isinstance(event, str):
                    said.append(event)
                yield event
        await _answer_write(turn, end.text)
    except KiteMeshError as error:
        end = TurnEnd(INTERRUPTED, await _charged(run), text="".join(said), error=error)
        await _answer_write(turn, end.text, error.message)
    except (asyncio.CancelledError, GeneratorExit):
        if end is None:
            await asyncio.shield(_answer_write(turn, "".join(said), STOPPED))
        raise
    finally:
        await stream_release(turn.slots)
    yield end


async def turn_complete(turn: Turn) -> TurnEnd:
    """The turn run to its end (a page without JavaScript waits for it)."""
    async for event in turn_events(turn):
        if isinstance(event, TurnEnd):
            return event
    raise AssertionError("turn_events ends with a TurnEnd")


def _end(event: Answered | Pause) -> TurnEnd:
    if isinstance(event, Answered):
        return TurnEnd(COMPLETED, event.body["kitemesh"]["credits_charged"], text=event.reply.content or "")
    return TurnEnd(WAITING, event.response["kitemesh"]["credits_charged"], approval_id=event.approval.id)


async def _charged(run: Run) -> int:
    """What a run that stopped was charged (its settlement's), 0 when it could not be written."""
    try:
        return await asyncio.shield(run.settlement) if run.settlement is not None else 0
    except KiteMeshError:
        return 0


async def _answer_write(turn: Turn, content: str, error: str = "") -> None:
    conversation, execution = turn.conversation, turn.run.execution
    await in_db_thread(
        assistant_message_write, conversation=conversation, execution=execution, content=content, error=error
    )
