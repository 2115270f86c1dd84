"""Forms of the finance pages: the period and filters (GET) and the grant/adjustment form (POST).
Team choices are always the teams the person may see, so a forged team id is just an invalid choice."""

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from django import forms
from django.db.models import QuerySet
from django.http import QueryDict
from django.utils import timezone

from billing.models import LedgerEntry
from core.models import Team

DEFAULT_DAYS = 30
MAX_DAYS = 366


@dataclass(frozen=True)
class Period:
    """Whole UTC days, `since` and `until` inclusive as shown; `start`/`end` is the half-open datetime range."""

    since: date
    until: date

    @property
    def start(self) -> datetime:
        return datetime.combine(self.since, time.min, tzinfo=timezone.get_current_timezone())

    @property
    def end(self) -> datetime:
        return datetime.combine(self.until + timedelta(days=1), time.min, tzinfo=timezone.get_current_timezone())


def _date_or_none(text: str | None) -> date | None:
    try:
        return date.fromisoformat(text) if text else None
    except ValueError:
        return None  # reported by the form's own validation


def _day_start(day: date | None) -> datetime | None:
    return None if day is None else datetime.combine(day, time.min, tzinfo=timezone.get_current_timezone())


class TeamChoiceForm(forms.Form):
    def __init__(self, *args, teams: QuerySet[Team], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = teams.order_by("name")


class PeriodForm(TeamChoiceForm):
    """The overview's period and optional team; build it with `from_query` so missing dates show as the
    default period (the 30 days up to `until`, or up to today)."""

    team = forms.ModelChoiceField(queryset=Team.objects.none(), required=False, empty_label="All teams")
    since = forms.DateField(widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(widget=forms.DateInput(attrs={"type": "date"}))

    @classmethod
    def from_query(cls, query: QueryDict, *, teams: QuerySet[Team]) -> "PeriodForm":
        data = query.dict()
        until = _date_or_none(data.get("until")) or timezone.localdate()
        if not data.get("until"):
            data["until"] = until.isoformat()
        if not data.get("since"):
            data["since"] = (until - timedelta(days=DEFAULT_DAYS - 1)).isoformat()
        return cls(data, teams=teams)

    def clean(self) -> dict:
        data = super().clean()
        since, until = data.get("since"), data.get("until")
        if since and until and since > until:
            raise forms.ValidationError("The start date is after the end date.")
        if since and until and (until - since).days >= MAX_DAYS:
            raise forms.ValidationError(f"Choose at most {MAX_DAYS} days.")
        return data

    def period(self) -> Period:
        """The chosen period, or the default one when the choice is invalid (the errors are shown)."""
        if self.is_valid():
            return Period(since=self.cleaned_data["since"], until=self.cleaned_data["until"])
        until = timezone.localdate()
        return Period(since=until - timedelta(days=DEFAULT_DAYS - 1), until=until)

    def selected_team(self) -> Team | None:
        return self.cleaned_data.get("team") if self.is_valid() else None

    def team_scope(self, teams: QuerySet[Team]) -> QuerySet[Team]:
        team = self.selected_team()
        return teams.filter(pk=team.pk) if team else teams


class LedgerFilterForm(TeamChoiceForm):
    """Ledger filters; each is optional and an invalid one is reported and ignored."""

    team = forms.ModelChoiceField(queryset=Team.objects.none(), required=False, empty_label="All teams")
    kind = forms.ChoiceField(choices=[("", "All kinds"), *LedgerEntry.Kind.choices], required=False)
    since = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    execution = forms.UUIDField(required=False, label="Execution id")

    def filters(self, teams: QuerySet[Team]) -> dict:
        """Keyword arguments for billing.selectors.ledger_entry_list."""
        self.is_valid()
        data = self.cleaned_data
        team = data.get("team")
        until = data.get("until")
        return {
            "teams": teams.filter(pk=team.pk) if team else teams,
            "kind": data.get("kind") or None,
            "since": _day_start(data.get("since")),
            "until": _day_start(until + timedelta(days=1)) if until else None,
            "execution_id": data.get("execution"),
        }


class CreditGrantForm(TeamChoiceForm):
    """A grant (positive) or an adjustment (either sign), always with a reason for the audit trail."""

    team = forms.ModelChoiceField(queryset=Team.objects.none(), empty_label="Choose a team")
    kind = forms.ChoiceField(
        choices=[(LedgerEntry.Kind.GRANT, "Grant"), (LedgerEntry.Kind.ADJUSTMENT, "Adjustment")],
        initial=LedgerEntry.Kind.GRANT,
    )
    amount = forms.IntegerField(
        help_text="Credits; an adjustment may be negative.", min_value=-(10**12), max_value=10**12
    )
    reason = forms.CharField(max_length=500, help_text="Why: kept in the ledger with your name.")

    def __init__(self, *args, **kwargs) -> None:
        # Its own element ids: it shares the overview page with the period form (both have a "team").
        kwargs.setdefault("auto_id", "grant_%s")
        super().__init__(*args, **kwargs)

    def clean(self) -> dict:
        data = super().clean()
        amount, kind = data.get("amount"), data.get("kind")
        if amount == 0:
            self.add_error("amount", "Enter a non-zero number of credits.")
        elif amount is not None and amount < 0 and kind == LedgerEntry.Kind.GRANT:
            self.add_error("amount", "A grant must be positive; use an adjustment to take credits away.")
        return data
