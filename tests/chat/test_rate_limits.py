"""Rate limits per token and per team: requests per minute and concurrent streams, answered with 429,
Retry-After and the error envelope; shared through Redis across server processes."""

import os
import threading
import time

import httpx
import pytest

from chat.services.tokens import token_create
from tests.conftest import Setup
from tests.support.server_process import ServerProcess
from tests.support.upstream import Reply

REDIS_TEST_URL = "redis://127.0.0.1:6379/15"  # a database of its own, emptied by the test


def _chat(http: httpx.Client, setup: Setup, raw_token: str | None = None, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {raw_token or setup.raw_token}"}
    payload = {"model": setup.model, "messages": [{"role": "user", "content": "Hi"}], **body}
    return http.post("/v1/chat/completions", json=payload, headers=headers)


def _inside_one_window() -> None:
    """Requests-per-minute count in fixed one-minute windows: start a test's burst well inside one, so
    its requests are not split across two windows."""
    into = time.time() % 60
    if into > 45:
        time.sleep(60 - into + 0.1)


def _assert_429(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert error["request_id"] == response.headers["x-request-id"]
    assert 1 <= int(response.headers["retry-after"]) <= 60


def test_a_token_over_its_requests_per_minute_gets_429_with_retry_after(live, http, setup, upstream):
    setup.token.requests_per_minute = 2
    setup.token.save(update_fields=["requests_per_minute"])
    _inside_one_window()

    statuses = [_chat(http, setup).status_code for _ in range(2)]
    refused = _chat(http, setup)

    assert statuses == [200, 200]
    _assert_429(refused)
    assert len(upstream.received) == 2  # the refused request reached no upstream


def test_a_team_limit_counts_every_token_of_the_team(live, http, setup, upstream):
    setup.team.requests_per_minute = 3
    setup.team.save(update_fields=["requests_per_minute"])
    _, other_raw = token_create(team=setup.team, name="second")
    _inside_one_window()

    answers = [
        _chat(http, setup).status_code,
        _chat(http, setup, other_raw).status_code,
        _chat(http, setup).status_code,
    ]
    refused = _chat(http, setup, other_raw)

    assert answers == [200, 200, 200]
    _assert_429(refused)


def test_open_streams_beyond_the_limit_get_429_and_the_slot_comes_back_when_a_stream_ends(live, setup, upstream):
    setup.token.concurrent_streams = 1
    setup.token.save(update_fields=["concurrent_streams"])
    upstream.queue(Reply(chunks=["a", "b", "c", "d"], chunk_delay=0.4), Reply(content="after"))
    first_started = threading.Event()

    def first_stream() -> int:
        with httpx.Client(base_url=live.url, timeout=30) as client:
            payload = {"model": setup.model, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
            with client.stream("POST", "/v1/chat/completions", json=payload, headers=setup.headers) as response:
                for _ in response.iter_lines():
                    first_started.set()
                return response.status_code

    thread = threading.Thread(target=first_stream)
    thread.start()
    assert first_started.wait(10)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        _assert_429(_chat(http, setup, stream=True))
        assert _chat(http, setup).status_code == 200  # the stream limit leaves plain requests alone
        thread.join(10)
        again = _chat(http, setup, stream=True)

    assert again.status_code == 200 and again.text.endswith("data: [DONE]\n\n")


def test_a_stream_that_fails_before_its_first_byte_gives_its_slot_back(live, http, setup, upstream):
    setup.token.concurrent_streams = 1
    setup.token.save(update_fields=["concurrent_streams"])
    upstream.queue(Reply(status=500), Reply(content="fine"))

    failed = _chat(http, setup, stream=True)
    retried = _chat(http, setup, stream=True)

    assert failed.status_code == 502
    assert retried.status_code == 200


def _redis_or_skip() -> None:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=1)
        client.flushdb()
    except redis.RedisError:
        if os.environ.get("KITEMESH_REQUIRE_SERVICES") == "1":
            pytest.fail("Redis is unreachable on 127.0.0.1:6379")
        pytest.skip("Redis is not running on 127.0.0.1:6379")


def test_limits_hold_across_two_server_processes_through_redis(transactional_db, setup, upstream):
    _redis_or_skip()
    setup.token.requests_per_minute = 3
    setup.token.save(update_fields=["requests_per_minute"])
    env = {"REDIS_URL": REDIS_TEST_URL}

    with ServerProcess(env=env) as first, ServerProcess(env=env) as second:
        _inside_one_window()
        statuses = []
        for server in (first, second, first, second):
            with httpx.Client(base_url=server.url, timeout=30) as http:
                statuses.append(_chat(http, setup).status_code)
                time.sleep(0.05)

    assert statuses == [200, 200, 200, 429]
