"""Reads every app makes of the shared models: the teams a person works for, the runs a token may see."""

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Exists, Q, QuerySet

from core.models import ApiToken, Team


def team_list_for_user(*, user: AbstractBaseUser, every_team: bool) -> QuerySet[Team]:
    """The teams a person works for on the pages; `every_team` (superusers, or staff where a page
    allows it) sees them all."""
    teams = Team.objects.order_by("name")
    return teams if every_team else teams.filter(members=user)


def runs_in_token_scope(*, token: ApiToken) -> Q:
    """A filter on a run's `team` and `group` (executions, approvals): those of the token's team whose group
    its scope covers (its selection, or every group, minus its exclusions); a token scoped to groups does
    not see runs whose group is gone."""
    selected = ApiToken.groups.through.objects.filter(apitoken_id=token.pk).values("group_id")
    excluded = ApiToken.excluded_groups.through.objects.filter(apitoken_id=token.pk).values("group_id")
    in_selection = Q(group_id__in=selected) | ~Exists(selected)
    return Q(team_id=token.team_id) & ~Q(group_id__in=excluded) & in_selection
