"""The group operating modes beyond `normal`: how `auto` chooses, the synthesis phase (every agent
answers in parallel, the brain writes the final answer from theirs) and orchestration's delegate tool
(the brain hands sub-tasks to agents, several per round, over several rounds)."""

import json
from dataclasses import dataclass

from chat.engine.providers import ModelEndpoint
from chat.errors import InvalidRequest
from core.models import CustomModel, Group, GroupAgent, Mode

DELEGATE_TOOL = "delegate_to_agent"
AGENT_CONCURRENCY = 4  # agent calls in flight at once for one request
SYNTHESIS_NOTE = "Your agents answered the conversation above. Write the final answer for the user from their answers."


@dataclass
class Agent:
    """A group agent as a run uses it: its name, model, endpoint and system instruction."""

    name: str
    model: CustomModel
    endpoint: ModelEndpoint
    system: str

    @classmethod
    def of(cls, agent: GroupAgent, endpoint: ModelEndpoint) -> "Agent":
        return cls(name=agent.name, model=agent.model, endpoint=endpoint, system=agent.role or agent.model.system)


def mode_resolve(group: Group, requested: str | None, *, has_agents: bool, has_tools: bool) -> str:
    """The mode a request runs in. `auto` is a rule, not a model call (cheap, deterministic, free):
    no agents → normal; agents and tools → orchestration (the brain delegates and acts); agents only
    → synthesis (every agent's view, one answer)."""
    mode = requested or group.mode
    if mode == Mode.AUTO:
        if not has_agents:
            return Mode.NORMAL
        return Mode.ORCHESTRATION if has_tools else Mode.SYNTHESIS
    if mode in (Mode.SYNTHESIS, Mode.ORCHESTRATION) and not has_agents:
        raise InvalidRequest(f"Mode {mode!r} needs a group with agents; this group has none.", param="metadata.mode")
    return mode


def agent_messages(agent: Agent, conversation: list[dict]) -> list[dict]:
    """What an agent is sent in synthesis: its own instruction, then the client's conversation."""
    return ([{"role": "system", "content": agent.system}] if agent.system else []) + conversation


def task_messages(agent: Agent, task: str) -> list[dict]:
    """What an agent is sent for a delegated task: its instruction and the task alone."""
    return ([{"role": "system", "content": agent.system}] if agent.system else []) + [{"role": "user", "content": task}]


def synthesis_note(answers: list[tuple[str, str | None, str]]) -> dict:
    """The brain's view of its agents' work: each answer labelled by agent, failures named.
    `answers` holds (agent name, answer or None, error)."""
    parts = [SYNTHESIS_NOTE]
    for name, answer, error in answers:
        parts.append(f"### {name}\n{answer}" if answer is not None else f"### {name}\n(failed: {error})")
    return {"role": "system", "content": "\n\n".join(parts)}


def delegate_spec(agents: list[Agent]) -> dict:
    """The tool orchestration offers the brain."""
    described = "; ".join(f"{a.name}: {a.system[:200]}" if a.system else a.name for a in agents)
    return {
        "type": "function",
        "function": {
            "name": DELEGATE_TOOL,
            "description": (
                f"Hand a self-contained sub-task to one of your agents and get its answer. Agents: {described}"
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "agent": {"type": "string", "enum": [a.name for a in agents]},
                    "task": {"type": "string", "description": "Everything the agent needs to do the task."},
                },
                "required": ["agent", "task"],
            },
        },
    }


def delegate_arguments(arguments: str, agents: dict[str, Agent]) -> tuple[Agent, str]:
    """The agent and task of a delegate call; ValueError with a message for the brain otherwise."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        raise ValueError("arguments are not valid JSON") from None
    if not isinstance(value, dict) or not isinstance(value.get("task"), str) or not value["task"].strip():
        raise ValueError("give an 'agent' name and a non-empty 'task'")
    agent = agents.get(value.get("agent"))
    if agent is None:
        raise ValueError(f"no agent named {value.get('agent')!r}; agents: {', '.join(agents)}")
    return agent, value["task"]
