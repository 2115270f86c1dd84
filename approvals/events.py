"""Approvals' browser events over django-eventstream (SSE): one channel per team, readable only by that team's
approvers (the live queue), and one per approval, readable also by the person whose chat waits on it (the
conversation page continues when it is decided). Events carry ids and labels, never arguments; pages re-read
what they show."""

import logging
import uuid
from collections.abc import Iterable

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Q
from django_eventstream import send_event
from django_eventstream.channelmanager import DefaultChannelManager

from approvals.selectors import approver_team_ids
from core.models import Approval

logger = logging.getLogger(__name__)

CREATED = "approval.created"
DECIDED = "approval.decided"
RESUMED = "approval.resumed"
EXPIRED = "approval.expired"
INTERRUPTED = "approval.interrupted"

# Superusers see every team: one channel carrying all teams' events spares them a stream per team
# (django-eventstream takes 10 channels per stream, and browsers open at most 6 streams per host).
ALL_TEAMS_CHANNEL = "all-teams"


def team_channel(team_id: int) -> str:
    return f"team-{team_id}"


def approval_channel(approval_id: uuid.UUID | str) -> str:
    return f"approval-{approval_id}"


def readable_channels(*, user: AbstractBaseUser) -> set[str]:
    channels = {team_channel(team_id) for team_id in approver_team_ids(user=user)}
    if channels and user.is_superuser:
        channels.add(ALL_TEAMS_CHANNEL)
    return channels


def page_channels(*, user: AbstractBaseUser, team_ids: list[int]) -> list[str]:
    """The channels a queue page listens to: its teams', or the one of all teams for a superuser."""
    if user.is_superuser:
        return [ALL_TEAMS_CHANNEL] if team_ids else []
    return [team_channel(team_id) for team_id in sorted(team_ids)]


def channels_readable(*, user: AbstractBaseUser, channels: Iterable[str]) -> bool:
    """Whether `user` may follow every one of `channels`: a team's (see readable_channels), or an approval's
    when its run is the user's own chat or the user approves for its team."""
    teams = readable_channels(user=user)
    return all(channel in teams or _approval_readable(user, channel) for channel in channels)


def _approval_readable(user: AbstractBaseUser, channel: str) -> bool:
    try:
        approval_id = uuid.UUID(channel.removeprefix("approval-")) if channel.startswith("approval-") else None
    except ValueError:
        return False
    if approval_id is None or not (user.is_authenticated and user.is_active):
        return False
    whose = Q(execution__user=user) | Q(team_id__in=approver_team_ids(user=user))
    return Approval.objects.filter(whose, pk=approval_id).exists()


class ApprovalChannelManager(DefaultChannelManager):
    """Channels are named in the `channel` query parameters (see channels_readable; django-eventstream calls
    this when a stream opens and again after an overflow)."""

    def can_read_channel(self, user: AbstractBaseUser | None, channel: str) -> bool:
        return user is not None and channels_readable(user=user, channels=[channel])

    def is_channel_reliable(self, channel: str) -> bool:
        # No event storage: a page that (re)connects re-reads the queue instead of replaying events.
        return False


def approval_event_send(*, team_id: int, event_type: str, data: dict) -> None:
    """Send one event to the team's approvers' browsers. Called after commit: a failure (Redis down) is
    logged, never raised into the request that already committed its decision."""
    try:
        for channel in (team_channel(team_id), ALL_TEAMS_CHANNEL, approval_channel(data["approval_id"])):
            send_event(channel, event_type, data)
    except Exception:
        logger.exception("approval event %s for team %s was not sent", event_type, team_id)
