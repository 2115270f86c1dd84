"""The API's database connection upkeep, which Django's request signals do for pages: the API handler
sends none (each would cost a thread hop), so the API does it itself (README, Benchmarks)."""

from asgiref.sync import SyncToAsync
from django.db import connections

from tests.conftest import Setup


def _api_thread_connection_open() -> bool:
    # The API's sync work runs on asgiref's one long-lived thread (kitemesh_site.asgi.ApiHandler).
    return SyncToAsync.single_thread_executor.submit(lambda: connections["default"].connection is not None).result()


def test_with_conn_max_age_0_an_api_request_closes_its_connection_when_it_ends(http, setup: Setup, settings):
    assert settings.DATABASES["default"]["CONN_MAX_AGE"] == 0  # the test settings'

    response = http.get("/v1/models", headers=setup.headers)

    assert response.status_code == 200
    assert response.json()["data"][0]["id"] == setup.model
    assert not _api_thread_connection_open()
