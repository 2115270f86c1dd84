"""SPEC section 2: Bearer `km_…` authentication on every API endpoint, the 401 envelope, how a token is
stored (hashed, never in clear), and what a valid token sees on /v1/models and /v1/credits."""

import hashlib
import json
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from billing.models import CreditAccount, LedgerEntry
from chat.services.tokens import token_create, token_revoke
from core.models import ApiToken, Execution, Group
from tests.conftest import Setup, make_setup
from tests.support.statements import statements_logged

MISSING = "Missing Bearer API token"
ENDPOINTS = [("post", "/v1/chat/completions"), ("get", "/v1/models"), ("get", "/v1/credits")]


def call(http, method: str, path: str, setup: Setup, authorization: str | None):
    headers = {} if authorization is None else {"Authorization": authorization}
    if method == "post":
        body = {"model": setup.model, "messages": [{"role": "user", "content": "Hi"}]}
        return http.post(path, json=body, headers=headers)
    return http.get(path, headers=headers)


def unauthorized(response) -> dict:
    """Check a 401 in the SPEC's envelope, with X-Request-ID and WWW-Authenticate; return its error."""
    assert response.status_code == 401, response.content
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "code", "request_id"}
    assert error["type"] == "authentication_error"
    assert error["code"] == "authentication_error"
    assert error["request_id"].startswith("req_")
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    return error


def changed_tail(raw: str) -> str:
    return raw[:-1] + ("A" if raw[-1] != "A" else "B")


# --- No usable Bearer header -----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="no-header"),
        pytest.param("", id="empty-header"),
        # ("Bearer " is "Bearer" on the wire: HTTP drops a header value's trailing whitespace.)
        pytest.param("Bearer", id="bearer-alone"),
        pytest.param("bearer", id="lowercase-bearer-alone"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic-scheme"),
        pytest.param("TOKEN", id="raw-token-without-scheme"),
        pytest.param("Token TOKEN", id="token-scheme-with-valid-secret"),
    ],
)
def test_missing_or_non_bearer_authorization_is_401_missing_bearer_api_token(
    http, setup: Setup, upstream, method, path, authorization
):
    if authorization is not None:
        authorization = authorization.replace("TOKEN", setup.raw_token)

    response = call(http, method, path, setup, authorization)

    assert unauthorized(response)["message"] == MISSING
    assert upstream.received == []


def test_missing_header_is_401_on_the_live_server_too(live, http, setup: Setup, upstream):
    response = http.post("/v1/chat/completions", json={"model": setup.model, "messages": []})

    assert unauthorized(response)["message"] == MISSING
    assert upstream.received == []


# --- A Bearer token that is not a live token -----------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize(
    "make_raw",
    [
        pytest.param(lambda s: "km_wrong", id="short-wrong"),
        pytest.param(lambda s: "km_" + "x" * 43, id="unknown-prefix"),
        pytest.param(lambda s: "sk-" + s.raw_token[3:], id="other-scheme-prefix"),
        pytest.param(lambda s: changed_tail(s.raw_token), id="right-prefix-wrong-secret"),
        pytest.param(lambda s: s.raw_token + "x", id="token-with-extra-char"),
        pytest.param(lambda s: s.raw_token[:12], id="lookup-prefix-only"),
        pytest.param(lambda s: s.token.secret_hash, id="the-stored-hash"),
    ],
)
def test_wrong_bearer_token_is_401_with_another_message(http, setup: Setup, upstream, method, path, make_raw):
    response = call(http, method, path, setup, f"Bearer {make_raw(setup)}")

    message = unauthorized(response)["message"]
    assert message != MISSING
    assert upstream.received == []


def test_right_prefix_wrong_secret_keeps_the_real_token_working(http, setup: Setup):
    wrong = changed_tail(setup.raw_token)
    assert wrong[:12] == setup.raw_token[:12]

    assert unauthorized(http.get("/v1/credits", headers={"Authorization": f"Bearer {wrong}"}))["message"] != MISSING
    assert http.get("/v1/credits", headers={"Authorization": f"Bearer {setup.raw_token}"}).status_code == 200


def test_expired_token_is_401(http, setup: Setup, upstream):
    _, expired = token_create(team=setup.team, name="expired", expires_at=timezone.now() - timedelta(seconds=1))
    _, live_one = token_create(team=setup.team, name="future", expires_at=timezone.now() + timedelta(hours=1))

    for method, path in ENDPOINTS:
        assert unauthorized(call(http, method, path, setup, f"Bearer {expired}"))["message"] != MISSING
    assert upstream.received == []
    assert http.get("/v1/credits", headers={"Authorization": f"Bearer {live_one}"}).status_code == 200


def test_revoked_token_is_401(http, setup: Setup, upstream):
    headers = {"Authorization": f"Bearer {setup.raw_token}"}
    assert http.get("/v1/models", headers=headers).status_code == 200

    assert token_revoke(token=setup.token) is True

    for method, path in ENDPOINTS:
        assert unauthorized(call(http, method, path, setup, f"Bearer {setup.raw_token}"))["message"] != MISSING
    assert upstream.received == []


# --- A token revoked or expired after this worker read it ------------------------------------------
# A completion takes a token its worker keeps without a query; the statement that starts the run checks the
# configuration is still at the version the token was read at (chat.services.tokens.token_recent).


def _completion(http, setup: Setup, **body):
    payload = {"model": setup.model, "messages": [{"role": "user", "content": "Hi"}]} | body
    return http.post("/v1/chat/completions", json=payload, headers=setup.headers)


def _written(setup: Setup) -> tuple:
    account = CreditAccount.objects.get(team=setup.team)
    return Execution.objects.count(), LedgerEntry.objects.count(), account.balance, account.held


def _token_rows_read(statements: list[str]) -> list[str]:
    return [s for s in statements if 'chat_apitoken" WHERE prefix' in s]


def _version_reads(statements: list[str]) -> list[str]:
    """core.config_version.config_version's reads (not the guard inside a run's start)."""
    return [s for s in statements if s.startswith('SELECT version FROM "core_configversion"')]


@pytest.mark.parametrize("ends", ["revoked", "expired"])
def test_a_token_that_ended_since_its_last_request_starts_nothing(http, setup: Setup, upstream, ends):
    assert _completion(http, setup).status_code == 200  # the worker has read the token
    before, calls = _written(setup), len(upstream.received)
    if ends == "revoked":
        assert token_revoke(token=setup.token) is True
    else:  # changed behind the worker's back: no signal clears its caches
        ApiToken.objects.filter(pk=setup.token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    with statements_logged() as queries:
        response = _completion(http, setup)

    unauthorized(response)
    # Taken without a query; the run's start found the configuration changed, and the token read again.
    assert len(_token_rows_read(queries)) == 1
    assert len(upstream.received) == calls
    assert _written(setup) == before


def test_a_revoked_token_cannot_replay_its_earlier_answer(http, setup: Setup, upstream):
    metadata = {"request_id": "req_before_revocation"}
    assert _completion(http, setup, metadata=metadata).status_code == 200
    assert _completion(http, setup, metadata=metadata).status_code == 200  # the replay, while live
    assert token_revoke(token=setup.token) is True

    unauthorized(_completion(http, setup, metadata=metadata))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"messages": []}, id="invalid-body"),
        pytest.param({"model": f"group:{uuid.UUID(int=7)}"}, id="unknown-group"),
        pytest.param({"metadata": {"request_id": "x" * 129}}, id="invalid-request-id"),
    ],
)
def test_a_revoked_token_gets_its_401_before_any_other_error(http, setup: Setup, upstream, body):
    assert _completion(http, setup).status_code == 200
    assert _completion(http, setup, **body).status_code in (400, 404)  # what a live token gets
    assert token_revoke(token=setup.token) is True

    unauthorized(_completion(http, setup, **body))


def test_a_token_kept_at_the_current_configuration_is_not_read_again(http, setup: Setup, upstream):
    assert _completion(http, setup).status_code == 200

    with statements_logged() as completion:
        assert _completion(http, setup).status_code == 200
    with statements_logged() as credits:
        assert http.get("/v1/credits", headers=setup.headers).status_code == 200

    assert (_token_rows_read(completion), _version_reads(completion)) == ([], [])  # the run's start checks
    assert (_token_rows_read(credits), len(_version_reads(credits))) == ([], 1)


def test_a_group_changed_behind_the_workers_back_is_read_again(http, setup: Setup, upstream):
    """QuerySet.update() sends no signal: the configuration's version (raised by a trigger) still moves."""
    assert _completion(http, setup).status_code == 200
    Group.objects.filter(pk=setup.group.pk).update(max_output_tokens=77)

    assert _completion(http, setup).status_code == 200

    assert upstream.received[-1].body["max_tokens"] == 77


def test_lowercase_bearer_scheme_is_accepted(http, setup: Setup):
    response = http.get("/v1/credits", headers={"Authorization": f"bearer {setup.raw_token}"})

    assert response.status_code == 200, response.content


def test_each_401_gets_its_own_request_id(http, setup: Setup):
    first = unauthorized(http.get("/v1/models"))
    second = unauthorized(http.get("/v1/models"))

    assert first["request_id"] != second["request_id"]


# --- Storage -------------------------------------------------------------------------------------------


def test_token_is_stored_hashed_and_its_secret_is_in_no_column(setup: Setup):
    token, raw = token_create(team=setup.team, name="stored")
    assert raw.startswith("km_")
    assert len(raw) >= 40

    stored = ApiToken.objects.get(pk=token.pk)
    assert stored.secret_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert raw.startswith(stored.prefix)
    assert len(stored.prefix) < len(raw)

    table = connection.ops.quote_name(ApiToken._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {table} WHERE id = %s", [token.pk])
        columns = [c[0] for c in cursor.description]
        row = cursor.fetchone()
    assert "secret_hash" in columns
    for column, value in zip(columns, row, strict=True):
        assert raw not in str(value), column
        assert raw[12:] not in str(value), column  # not even the secret part after the lookup prefix


def test_two_tokens_never_share_a_secret_or_prefix(setup: Setup):
    first, first_raw = token_create(team=setup.team, name="one")
    second, second_raw = token_create(team=setup.team, name="two")

    assert first_raw != second_raw
    assert first.prefix != second.prefix
    assert first.secret_hash != second.secret_hash


# --- What a valid token sees ------------------------------------------------------------------------------


def models_of(http, raw: str) -> dict:
    response = http.get("/v1/models", headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 200, response.content
    assert response.headers["X-Request-ID"].startswith("req_")
    return response.json()


def model_entry(group: Group, team: str = "acme") -> dict:
    return {"id": f"group:{group.id}", "object": "model", "owned_by": team, "name": group.name}


def test_models_lists_the_team_groups_for_an_unscoped_token(http, setup: Setup, upstream):
    billing = Group.objects.create(id=uuid.uuid4(), team=setup.team, name="billing", brain=setup.brain)
    make_setup(upstream, team_name="other")  # its group must not show

    body = models_of(http, setup.raw_token)

    assert body == {"object": "list", "data": [model_entry(billing), model_entry(setup.group)]}


def test_models_lists_only_the_groups_in_the_token_scope(http, setup: Setup):
    billing = Group.objects.create(id=uuid.uuid4(), team=setup.team, name="billing", brain=setup.brain)
    _, scoped = token_create(team=setup.team, name="scoped", groups=[billing])

    assert models_of(http, scoped) == {"object": "list", "data": [model_entry(billing)]}


def test_models_leaves_out_excluded_groups(http, setup: Setup):
    billing = Group.objects.create(id=uuid.uuid4(), team=setup.team, name="billing", brain=setup.brain)
    token, raw = token_create(team=setup.team, name="most")
    token.excluded_groups.add(billing)

    assert models_of(http, raw) == {"object": "list", "data": [model_entry(setup.group)]}


def test_models_of_another_team_token_show_only_that_team(http, setup: Setup, upstream):
    other = make_setup(upstream, team_name="other")

    assert models_of(http, other.raw_token) == {"object": "list", "data": [model_entry(other.group, "other")]}


def test_credits_shows_the_token_team_balance(http, setup: Setup):
    response = http.get("/v1/credits", headers={"Authorization": f"Bearer {setup.raw_token}"})

    assert response.status_code == 200, response.content
    assert response.json() == {
        "object": "credit_balance",
        "team": "acme",
        "balance": 1000,
        "held": 0,
        "token": {
            "name": "test",
            "credit_limit": None,
            "credit_period": None,
            "spent": 0,
            "held": 0,
            "resets_at": None,
        },
    }
    assert response.headers["X-Request-ID"].startswith("req_")


def test_credits_of_another_team_token_show_that_team(http, setup: Setup, upstream):
    other = make_setup(upstream, team_name="other", credits=250)

    response = http.get("/v1/credits", headers={"Authorization": f"Bearer {other.raw_token}"})

    body = response.json()
    assert (body["team"], body["balance"], body["held"], body["token"]["name"]) == ("other", 250, 0, "test")


def test_valid_token_works_on_the_live_server(live, http, setup: Setup, upstream):
    models = http.get("/v1/models", headers=setup.headers)
    credits = http.get("/v1/credits", headers=setup.headers)
    chat = http.post(
        "/v1/chat/completions",
        headers=setup.headers,
        json={"model": setup.model, "messages": [{"role": "user", "content": "Hi"}]},
    )

    assert models.json() == {"object": "list", "data": [model_entry(setup.group)]}
    assert {k: v for k, v in credits.json().items() if k != "token"} == {
        "object": "credit_balance",
        "team": "acme",
        "balance": 1000,
        "held": 0,
    }
    assert chat.status_code == 200, chat.text
    assert len(upstream.received) == 1
    assert setup.raw_token not in json.dumps(upstream.received[0].headers)
