"""Management commands (SPEC §4): issue_token, revoke_token, grant_credits."""

import io
import re
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from billing.models import CreditAccount, LedgerEntry
from chat.services.tokens import token_hash
from core.models import ApiToken, Tool
from tests.conftest import Setup, make_setup
from tests.support.helpers import live_token

TOKEN_LINE = re.compile(r"^km_[A-Za-z0-9_-]{43}$")


def run(command: str, *args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(command, *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def issue(*args: str) -> str:
    """The raw token issue_token printed on its last stdout line."""
    out, _ = run("issue_token", *args)
    return out.rstrip("\n").splitlines()[-1]


@pytest.fixture
def tool(setup: Setup) -> Tool:
    return Tool.objects.create(team=setup.team, name="create_ticket", url="https://crm.example/tickets")


def test_issue_token_prints_the_token_alone_on_the_last_stdout_line(setup: Setup):
    out, err = run("issue_token", "--team", "acme", "--name", "ci")

    last = out.rstrip("\n").splitlines()[-1]
    assert TOKEN_LINE.match(last), out
    assert last not in err
    token = ApiToken.objects.get(team=setup.team, name="ci")
    assert token.secret_hash == token_hash(last)
    assert last not in (token.prefix, token.secret_hash)


def test_issued_token_authenticates_for_its_team(setup: Setup):
    raw = issue("--team", "acme", "--name", "ci")

    token = live_token(raw)

    assert token is not None
    assert (token.name, token.team, token.expires_at) == ("ci", setup.team, None)
    assert not token.groups.exists() and not token.tools.exists()


def test_issue_token_stores_group_and_tool_scope(setup: Setup, tool: Tool):
    raw = issue("--team", "acme", "--name", "scoped", "--group", str(setup.group.id), "--tool", "create_ticket")

    token = live_token(raw)
    assert list(token.groups.all()) == [setup.group]
    assert list(token.tools.all()) == [tool]


def test_issue_token_expires_in_sets_expires_at(setup: Setup):
    before = timezone.now()
    raw = issue("--team", "acme", "--name", "short", "--expires-in", "3600")
    after = timezone.now()

    token = ApiToken.objects.get(name="short")
    assert before + timedelta(seconds=3600) <= token.expires_at <= after + timedelta(seconds=3600)
    assert live_token(raw) == token


def test_token_past_its_expiry_no_longer_authenticates(setup: Setup):
    raw = issue("--team", "acme", "--name", "short", "--expires-in", "60")
    ApiToken.objects.filter(name="short").update(expires_at=timezone.now() - timedelta(seconds=1))

    assert live_token(raw) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--team", "initech"], "initech", id="unknown-team"),
        pytest.param(["--team", "acme", "--group", "00000000-0000-4000-8000-00000000dead"], "--group", id="no-group"),
        pytest.param(["--team", "acme", "--group", "support"], "--group", id="group-not-a-uuid"),
        pytest.param(["--team", "acme", "--tool", "delete_everything"], "delete_everything", id="unknown-tool"),
        pytest.param(["--team", "acme", "--expires-in", "0"], "--expires-in", id="non-positive-expiry"),
    ],
)
def test_issue_token_refuses_bad_arguments_and_creates_nothing(setup: Setup, args, message):
    count = ApiToken.objects.count()

    with pytest.raises(CommandError, match=re.escape(message)):
        run("issue_token", "--name", "new", *args)

    assert ApiToken.objects.count() == count


def test_issue_token_refuses_a_group_of_another_team(setup: Setup, upstream):
    other = make_setup(upstream, team_name="globex")

    with pytest.raises(CommandError, match="--group"):
        run("issue_token", "--team", "acme", "--name", "new", "--group", str(other.group.id))

    assert not ApiToken.objects.filter(name="new").exists()


def test_issue_token_refuses_a_second_active_token_with_the_same_name(setup: Setup):
    first = issue("--team", "acme", "--name", "ci")

    with pytest.raises(CommandError, match="already has an active token"):
        run("issue_token", "--team", "acme", "--name", "ci")

    assert ApiToken.objects.filter(name="ci").count() == 1
    assert live_token(first) is not None


def test_a_revoked_name_can_be_issued_again(setup: Setup):
    old = issue("--team", "acme", "--name", "ci")
    run("revoke_token", "--team", "acme", "--name", "ci")

    new = issue("--team", "acme", "--name", "ci")

    assert live_token(old) is None
    assert live_token(new).name == "ci"


def test_same_token_name_is_allowed_in_another_team(setup: Setup, upstream):
    make_setup(upstream, team_name="globex")
    issue("--team", "acme", "--name", "ci")

    raw = issue("--team", "globex", "--name", "ci")

    assert live_token(raw).team.name == "globex"


def test_revoke_token_stops_it_at_once(setup: Setup):
    raw = issue("--team", "acme", "--name", "ci")

    out, _ = run("revoke_token", "--team", "acme", "--name", "ci")

    assert "revoked" in out
    assert live_token(raw) is None
    assert ApiToken.objects.get(name="ci").revoked_at is not None
    assert live_token(setup.raw_token) == setup.token, "other tokens keep working"


def test_revoking_twice_is_an_error(setup: Setup):
    issue("--team", "acme", "--name", "ci")
    run("revoke_token", "--team", "acme", "--name", "ci")

    with pytest.raises(CommandError, match="ci"):
        run("revoke_token", "--team", "acme", "--name", "ci")


def test_revoke_token_needs_the_right_team(setup: Setup, upstream):
    make_setup(upstream, team_name="globex")

    with pytest.raises(CommandError):
        run("revoke_token", "--team", "globex", "--name", "no-such-token")
    with pytest.raises(CommandError):
        run("revoke_token", "--team", "initech", "--name", "test")

    assert live_token(setup.raw_token) == setup.token


def test_grant_credits_adds_a_grant_entry_and_raises_the_balance(setup: Setup):
    out, _ = run("grant_credits", "--team", "acme", "--amount", "250", "--reason", "pilot top-up")

    entry = LedgerEntry.objects.filter(team=setup.team).order_by("-id").first()
    assert (entry.kind, entry.amount, entry.reason) == ("grant", 250, "pilot top-up")
    assert (entry.balance_after, entry.held_after) == (1250, 0)
    assert CreditAccount.objects.get(team=setup.team).balance == 1250
    assert "1250" in out


def test_grant_credits_has_a_default_reason(setup: Setup):
    run("grant_credits", "--team", "acme", "--amount", "5")

    assert LedgerEntry.objects.filter(team=setup.team).order_by("-id").first().reason != ""


@pytest.mark.parametrize("amount", [0, -5])
def test_grant_credits_refuses_a_non_positive_amount(setup: Setup, amount: int):
    entries = LedgerEntry.objects.count()

    with pytest.raises(CommandError):
        call_command("grant_credits", team="acme", amount=amount, stdout=io.StringIO())

    assert LedgerEntry.objects.count() == entries
    assert CreditAccount.objects.get(team=setup.team).balance == 1000


def test_grant_credits_refuses_an_unknown_team(setup: Setup):
    with pytest.raises(CommandError, match="initech"):
        run("grant_credits", "--team", "initech", "--amount", "5")
