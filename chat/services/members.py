"""A person as a caller (SPEC §8): an active member of a team chats with every group of that team, under the
same rules as an API client (chat.engine), with rate limits of their own."""

import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Permission
from django.db import transaction

from chat.selectors import team_get
from chat.services.config_cache import version_check
from chat.services.tokens import token_reload
from core.callers import Caller
from core.errors import PermissionDenied
from core.models import Team


def member_caller(*, user: AbstractBaseUser, team_id: int) -> Caller:
    """The user as a caller in the team; 403 unless they are an active member of it. In a database thread."""
    version = version_check()
    if not (user.is_active and Team.members.through.objects.filter(team_id=team_id, user_id=user.pk).exists()):
        raise PermissionDenied("You are not a member of this group's team.", param="group")
    return Caller(team_get(team_id=team_id, version=version), version, user=user)


def caller_reload(*, caller: Caller) -> Caller:
    """The caller as the database has it now, after the configuration changed under its request: its token
    read again (401 when revoked meanwhile), or the person's membership checked again."""
    if caller.token is not None:
        return token_reload(token=caller.token)
    return member_caller(user=caller.user, team_id=caller.team.pk)


@transaction.atomic
def member_add(*, team: Team, username: str, approver: bool = False, new_password: bool = False) -> str | None:
    """Make `username` (created when missing) an active member of `team`, an approver too when asked. Returns
    the password it set — a new user's, or a new one when asked — shown once, never stored in clear."""
    user, created = get_user_model().objects.get_or_create(username=username)
    password = secrets.token_urlsafe(12) if created or new_password else None
    if password is not None:
        user.set_password(password)
    user.is_active = True
    user.save()
    team.members.add(user)
    if approver:
        user.user_permissions.add(Permission.objects.get(content_type__app_label="core", codename="decide_approval"))
    return password
