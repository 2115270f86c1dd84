"""`synthesis`: every agent answers the client's conversation in parallel (bounded), one failing losing
nothing of the others; then the brain, in the normal loop, writes the final answer from their answers."""

from collections.abc import AsyncIterator

from chat.engine.agents import Agent, agent_worst_case, agents_run
from chat.engine.run import Progress, Run

SYNTHESIS_NOTE = "Your agents answered the conversation above. Write the final answer for the user from their answers."


def agent_messages(agent: Agent, conversation: list[dict]) -> list[dict]:
    """What an agent is sent: its own instruction, then the client's conversation."""
    return ([{"role": "system", "content": agent.system}] if agent.system else []) + conversation


def synthesis_note(answers: list[tuple[str, str | None, str]]) -> dict:
    """The brain's view of its agents' work: each answer labelled by agent, failures named.
    `answers` holds (agent name, answer or None, error)."""
    parts = [SYNTHESIS_NOTE]
    for name, answer, error in answers:
        parts.append(f"### {name}\n{answer}" if answer is not None else f"### {name}\n(failed: {error})")
    return {"role": "system", "content": "\n\n".join(parts)}


async def synthesis_run(run: Run) -> AsyncIterator[Progress]:
    """The agents answer (their worst case reserved first); their answers become the brain's note."""
    jobs = {name: (agent, agent_messages(agent, run.request.messages)) for name, agent in run.agents.items()}
    await run.reserve(sum(agent_worst_case(run, agent, messages) for agent, messages in jobs.values()))
    answers: dict[str, tuple[str | None, str]] = {}
    async for progress, name, answer, error in agents_run(run, jobs):
        if progress.status != "started":
            answers[name] = (answer, error)
        yield progress
    run.messages.append(synthesis_note([(name, *answers[name]) for name in run.agents]))
