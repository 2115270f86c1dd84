"""The API's database connection upkeep, which Django's request signals do for pages: the API handler
sends none (each would cost a thread hop), so the API does it itself (README, Benchmarks)."""

import threading
import time

from asgiref.sync import SyncToAsync
from django.db import connections

from core.db import _pool
from tests.conftest import Setup


def _api_thread_connection_open() -> bool:
    # DRF's authentication hop runs on asgiref's one long-lived thread.
    return SyncToAsync.single_thread_executor.submit(lambda: connections["default"].connection is not None).result()


def test_with_conn_max_age_0_an_api_request_closes_its_connection_when_it_ends(http, setup: Setup, settings):
    assert settings.DATABASES["default"]["CONN_MAX_AGE"] == 0  # the test settings'

    response = http.get("/v1/models", headers=setup.headers)

    assert response.status_code == 200
    assert response.json()["data"][0]["id"] == setup.model
    # The handler closes it just after the response is sent, which the client may see first: wait for it.
    deadline = time.monotonic() + 5
    while _api_thread_connection_open() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _api_thread_connection_open()


def _sessions_on_this_database() -> int:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        return cursor.fetchone()[0]


def test_with_conn_max_age_0_the_database_threads_close_their_connections_too(http, setup: Setup):
    postgresql = connections["default"].vendor == "postgresql"
    before = _sessions_on_this_database() if postgresql else 0

    for _ in range(3):  # the run's transactions go to the pool's threads
        response = http.post(
            "/v1/chat/completions",
            json={"model": setup.model, "messages": [{"role": "user", "content": "Hi"}]},
            headers=setup.headers,
        )
        assert response.status_code == 200, response.text

    assert any(thread.name.startswith("kitemesh-db") for thread in threading.enumerate())  # the pool served them
    if not postgresql:  # SQLite's pool is one thread
        assert not _pool().submit(lambda: connections["default"].connection is not None).result()
        return
    # The authentication thread's connection closes just after the response is sent: wait for it.
    deadline = time.monotonic() + 5
    while _sessions_on_this_database() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sessions_on_this_database() == before
