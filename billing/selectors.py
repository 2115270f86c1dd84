"""Read queries for credits."""

from billing.models import CreditAccount
from chat.models import Team


def credit_account_get(*, team: Team) -> CreditAccount:
    """The team's account; a team that never had credits reads as an empty account."""
    return CreditAccount.objects.filter(team=team).first() or CreditAccount(team=team)
