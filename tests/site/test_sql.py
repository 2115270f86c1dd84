"""core.sql, the request path's hand-written statements: what guards them against drifting from
the models, and the cursor they keep per connection."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.models import LedgerEntry
from core.sql import insert_derived, sql_rows


def test_a_derived_insert_must_give_every_column_of_the_model():
    columns = (("team_id", "t.team_id"), ("kind", "'hold'"), ("amount", "t.amount"))

    with pytest.raises(ValueError, match=r"no value for LedgerEntry column.*balance_after"):
        insert_derived(LedgerEntry, "t", columns)


@pytest.mark.django_db(transaction=True)
def test_the_kept_cursor_follows_its_connection_when_it_is_closed_and_opened_again():
    assert sql_rows("SELECT %s", [1]) == [(1,)]
    connection.close()

    assert sql_rows("SELECT %s", [2]) == [(2,)]


@pytest.mark.django_db
def test_statements_are_logged_when_django_logs_queries():
    sql_rows("SELECT %s", [1])  # a cursor kept from before the capture

    with CaptureQueriesContext(connection) as captured:
        sql_rows("SELECT %s + 1", [41])

    assert [q["sql"] for q in captured.captured_queries] == ["SELECT 41 + 1"]


@pytest.mark.django_db
def test_placeholders_and_escaped_percent_signs_survive_the_statement_being_run_again():
    for value in ("5", "6"):
        assert sql_rows("SELECT %s || '%%'", [value]) == [(f"{value}%",)]
