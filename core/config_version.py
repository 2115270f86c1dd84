"""The configuration's version: one number the database raises on every write to a table of configuration
(teams, vault secrets, models, tools, groups and their agents and fallbacks, API tokens and their scopes),
by triggers, so that no write escapes it (QuerySet.update(), raw SQL, another process). A cache of
configuration is good while the version it was read at is current: the hot path checks it inside the write
that starts a run (a Guard), everything else reads it first."""

from django.db import DEFAULT_DB_ALIAS, connections

from core.models import ApiToken, ConfigVersion, CustomModel, Group, GroupAgent, GroupFallback, Team, Tool, VaultSecret
from core.sql import Guard, sql_rows, table

_BUMP = "UPDATE core_configversion SET version = version + 1 WHERE id = 1"


def config_version() -> int:
    """The current version (its row made when a flush emptied it)."""
    rows = sql_rows(f"SELECT version FROM {table(ConfigVersion)} WHERE id = 1", [])
    return rows[0][0] if rows else ConfigVersion.objects.get_or_create(pk=1)[0].version


def config_guard(version: int) -> Guard:
    """True while the configuration is still at `version`."""
    return Guard(ConfigVersion, 1, "version", version)


def config_tables() -> list[str]:
    """The tables whose writes change the configuration a run reads."""
    models = [Team, VaultSecret, CustomModel, Tool, Group, GroupAgent, GroupFallback, ApiToken]
    through = [Group.tools, ApiToken.groups, ApiToken.excluded_groups, ApiToken.tools, ApiToken.excluded_tools]
    return [m._meta.db_table for m in models] + [t.through._meta.db_table for t in through]


def config_version_install(using: str = DEFAULT_DB_ALIAS, **_signal_kwargs) -> None:
    """The version's row and its triggers, (re)made idempotently after every migrate and flush (post_migrate):
    SQLite drops a table's triggers when a migration rebuilds the table, and a flush empties the row's."""
    ConfigVersion.objects.using(using).get_or_create(pk=1)
    db = connections[using]
    with db.cursor() as cursor:
        if db.vendor == "postgresql":
            cursor.execute(
                "CREATE OR REPLACE FUNCTION kitemesh_config_version_bump() RETURNS trigger LANGUAGE plpgsql"
                f" AS $$ BEGIN {_BUMP}; RETURN NULL; END $$"
            )
            for table in config_tables():
                cursor.execute(
                    f"CREATE OR REPLACE TRIGGER kitemesh_config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
                    f' ON "{table}" FOR EACH STATEMENT EXECUTE FUNCTION kitemesh_config_version_bump()'
                )
        else:
            for table in config_tables():
                for event in ("INSERT", "UPDATE", "DELETE"):
                    cursor.execute(
                        f'CREATE TRIGGER IF NOT EXISTS "kitemesh_config_changed_{table}_{event.lower()}"'
                        f' AFTER {event} ON "{table}" BEGIN {_BUMP}; END'
                    )
