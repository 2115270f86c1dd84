"""Small helpers the API tests share: reading SSE answers, polling, the team's credits."""

import json
import time
from collections.abc import Callable
from typing import Any

import httpx


def sse_chunks(response: httpx.Response) -> list[dict]:
    """The JSON chunks of an SSE answer, after checking its framing and its single final [DONE]."""
    lines = list(response.iter_lines())
    for line in lines:
        assert line == "" or line.startswith("data: "), f"unexpected SSE line {line!r}"
    payloads = [line.removeprefix("data: ") for line in lines if line]
    assert payloads[-1] == "[DONE]", payloads[-3:]
    assert payloads.count("[DONE]") == 1
    return [json.loads(p) for p in payloads[:-1]]


def wait_for(predicate: Callable[[], Any], timeout: float, message: str) -> Any:
    """Poll until `predicate()` is truthy (and return it), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(0.02)


def credits(http: httpx.Client, setup: Any) -> dict:
    """GET /v1/credits for the setup's team (its team part: the token's use is tests/billing/test_token_limits')."""
    response = http.get("/v1/credits", headers=setup.headers)
    assert response.status_code == 200, response.text
    return {key: value for key, value in response.json().items() if key != "token"}


def live_token(raw: str):
    """The live ApiToken of a bearer secret, or None (chat.services.tokens.token_authenticate's token)."""
    from chat.services.tokens import token_authenticate

    caller = token_authenticate(raw)
    return caller.token if caller else None
