"""What things cost in credits (SPEC §3): a model call from its tokens and its model's prices, a tool run
from its tool's price, and the most a call can cost before it is made (what a run holds for it). Tokens an
upstream does not report are estimated as ceil(characters / 4). Every hold and every charge is sized here."""

import json
import math
from decimal import Decimal

from core.models import CustomModel, Tool


def tokens_estimate(text_length: int) -> int:
    """The SPEC's estimate when an upstream reports no usage: ceil(characters / 4)."""
    return math.ceil(text_length / 4)


def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    text = content or ""
    for call in message.get("tool_calls") or ():
        text += call["function"]["name"] + call["function"]["arguments"]
    return text


def prompt_length(messages: list[dict]) -> int:
    return sum(len(message_text(m)) for m in messages)


def model_cost(model: CustomModel, prompt_tokens: int, completion_tokens: int) -> Decimal:
    """The exact cost of a model call (rounded up once, per request, when it is charged)."""
    return (prompt_tokens * model.input_per_1k + completion_tokens * model.output_per_1k) / 1000


def call_worst_case(model: CustomModel, messages: list[dict], tools: list[dict], max_tokens: int) -> int:
    """The most one model call can cost: its prompt (and tool specs) as estimated, plus every allowed
    output token."""
    prompt = tokens_estimate(prompt_length(messages) + (len(json.dumps(tools)) if tools else 0))
    return math.ceil(model_cost(model, prompt, max_tokens))


def tools_price(tools: list[Tool | None]) -> int:
    """What running these tools costs, rounded up once (an unknown tool, None, costs nothing)."""
    return math.ceil(sum((t.price for t in tools if t is not None), Decimal(0)))
