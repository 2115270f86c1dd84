"""What a run holds before it calls anything, so a team that cannot pay gets 402 before any model or tool
runs: a new run its first brain call (and in synthesis every agent's call and the brain's reading of their
answers); a resume the tools it will run, its round's delegations and the next brain call. Each further
step reserves its own worst case as it comes (Run.reserve). Prices are billing.pricing's."""

from collections.abc import Callable

from billing.pricing import call_worst_case, tools_price
from chat.engine.agents import Agent
from chat.engine.modes.orchestration import DELEGATE_TOOL, delegate_arguments, task_messages
from chat.engine.modes.synthesis import agent_messages, synthesis_note
from core.models import CustomModel, Mode, ToolExecution


def first_hold(
    *,
    brain: CustomModel,
    messages: list[dict],
    conversation: list[dict],
    specs: list[dict],
    max_tokens: int,
    agents: dict[str, Agent],
    mode: str,
) -> int:
    """A new run's hold: its first brain call over `messages`; in synthesis also every agent's call over the
    client's `conversation` and the brain's reading of their answers (up to max_tokens each, in the note)."""
    if mode != Mode.SYNTHESIS:
        return call_worst_case(brain, messages, specs, max_tokens)
    agent_calls = sum(
        call_worst_case(a.model, agent_messages(a, conversation), [], max_tokens) for a in agents.values()
    )
    note = synthesis_note([(name, "x" * max_tokens * 4, "") for name in agents])
    return agent_calls + call_worst_case(brain, [*messages, note], specs, max_tokens)


def resume_hold(
    *, brain: CustomModel, messages: list[dict], specs: list[dict], max_tokens: int, agents: dict[str, Agent]
) -> Callable[[list[ToolExecution]], int]:
    """What a resume holds when it claims its approval, given the round (known only then): the prices of
    the tools it will run, the worst case of the round's delegations, and the next brain call over the
    conversation as it stands (tool results, unknown yet, are reserved when they are in)."""
    next_brain_call = call_worst_case(brain, messages, specs, max_tokens)

    def delegation(call: ToolExecution) -> int:
        try:
            agent, task = delegate_arguments(call.arguments, agents)
        except ValueError:
            return 0  # refused without calling anyone
        return call_worst_case(agent.model, task_messages(agent, task), [], max_tokens)

    def amount(round_calls: list[ToolExecution]) -> int:
        running = [c.tool for c in round_calls if c.status != ToolExecution.Status.DENIED and c.tool is not None]
        delegations = [c for c in round_calls if c.tool_name == DELEGATE_TOOL and agents]
        return tools_price(running) + sum(delegation(c) for c in delegations) + next_brain_call

    return amount
