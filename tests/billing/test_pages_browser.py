"""/billing/ in headless Chromium against the live server: a finance person logs in, sees the usage chart and
the team's balance, grants credits through the form and sees the new balance. The full-page screenshot is
the README's picture (docs/img/billing.png)."""

import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone

from billing.models import CreditAccount, LedgerEntry
from chat.services.tokens import token_create
from core.models import Execution, Step, Tool
from tests.billing.test_finance_selectors import model_call, record_run, tool_call
from tests.conftest import Setup, make_setup
from tests.support.upstream import FakeUpstream

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "billing.png"
PASSWORD = "correct horse battery"


def two_weeks_of_usage(setup: Setup, globex: Setup) -> None:
    """Runs recorded through the real services, then dated over the last two weeks (auto_now_add leaves no
    other way to have history), so the chart and breakdowns look like a real month."""
    lookup = Tool.objects.create(team=setup.team, name="crm_lookup", url="https://crm.example/l", price=1)
    ci, _ = token_create(team=setup.team, name="ci-pipeline")
    now = timezone.now()
    for day in range(14):
        runs = [
            record_run(setup, lambda e, d=day: [model_call(setup.brain, 400 + 90 * d, 120 + 15 * (d % 5))]),
            record_run(setup, lambda e: [model_call(setup.brain, 300, 80), tool_call(e, lookup)], token=ci),
        ]
        if day % 3 == 0:
            runs.append(record_run(globex, lambda e: [model_call(globex.brain, 900, 300)]))
        when = now - timedelta(days=day, hours=2)
        for run in runs:
            Execution.objects.filter(pk=run.pk).update(created_at=when)
            Step.objects.filter(execution=run).update(created_at=when)
            LedgerEntry.objects.filter(execution=run).update(created_at=when)


@pytest.fixture
def finance(live, upstream: FakeUpstream) -> tuple[Setup, Setup, User]:
    acme = make_setup(upstream, credits=5000)
    globex = make_setup(upstream, team_name="globex", credits=2000, input_per_1k="5", output_per_1k="15")
    two_weeks_of_usage(acme, globex)
    user = User.objects.create_user("fiona", password=PASSWORD)
    user.user_permissions.add(Permission.objects.get(content_type__app_label="billing", codename="use_billing"))
    acme.team.members.add(user)
    globex.team.members.add(user)
    return acme, globex, user


def log_in(page, username: str, then: str) -> None:
    page.goto(then)
    assert "/accounts/login/" in page.url
    page.get_by_label("User name").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"**{then}")


def balance_of(page, team: str):
    return page.locator(f'tr[data-team="{team}"] [data-testid="balance"]')


def test_finance_sees_the_chart_and_balance_and_grants_credits(page, finance):
    acme, _, user = finance
    balance = CreditAccount.objects.get(team=acme.team).balance
    assert balance < 5000  # two weeks of charges

    log_in(page, "fiona", "/billing/")

    chart = page.get_by_role("img", name=re.compile(r"^Credits charged per day"))
    assert chart.is_visible()
    assert chart.locator("title").first.text_content().startswith("Credits charged per day")
    assert chart.locator("rect.bar").count() == 30
    assert balance_of(page, "acme").inner_text() == str(balance)
    assert page.get_by_role("heading", name="By tool").is_visible()
    assert page.get_by_role("rowheader", name="crm_lookup").is_visible()

    form = page.get_by_role("form", name="Grant or adjust credits")
    form.get_by_label("Team").select_option(label="acme")
    form.get_by_label("Kind").select_option(label="Grant")
    form.get_by_label("Amount").fill("250")
    form.get_by_label("Reason").fill("Q3 top-up approved by finance")
    form.get_by_role("button", name="Record credits").click()

    page.wait_for_url("**/billing/?team=*")
    assert (
        page.get_by_role("status")
        .inner_text()
        .startswith(f"Recorded grant of 250 credits for acme; balance now {balance + 250}.")
    )
    assert balance_of(page, "acme").inner_text() == str(balance + 250)
    entry = LedgerEntry.objects.order_by("-id").first()
    assert (entry.kind, entry.amount, entry.actor, entry.reason) == (
        "grant",
        250,
        user,
        "Q3 top-up approved by finance",
    )

    # The README's picture: both teams, the chart and the breakdowns, after the grant.
    page.goto("/billing/")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


def test_a_grant_without_a_reason_is_refused_in_the_browser(page, finance):
    acme, _, _ = finance
    entries = LedgerEntry.objects.count()
    log_in(page, "fiona", "/billing/grants/")

    form = page.get_by_role("form", name="Grant or adjust credits")
    form.get_by_label("Team").select_option(label="acme")
    form.get_by_label("Kind").select_option(label="Adjustment")
    form.get_by_label("Amount").fill("-999999")
    form.get_by_label("Reason").fill("clawback")
    form.get_by_role("button", name="Record credits").click()

    assert "below zero" in form.inner_text()
    assert page.get_by_role("status").inner_text().startswith("Nothing was recorded")
    assert LedgerEntry.objects.count() == entries
    # The reason is required in the browser too: the form does not submit without it.
    form.get_by_label("Reason").fill("")
    form.get_by_label("Amount").fill("5")
    form.get_by_role("button", name="Record credits").click()
    assert form.get_by_label("Reason").evaluate("el => el.validity.valueMissing") is True
    assert LedgerEntry.objects.count() == entries
    assert acme.team.pk


def test_the_overview_fits_a_phone_screen(browser, live, finance):
    context = browser.new_context(base_url=live.url, viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    try:
        log_in(page, "fiona", "/billing/")
        assert page.get_by_role("img", name=re.compile(r"^Credits charged per day")).is_visible()
        # Wide tables scroll inside their own box; the page itself never scrolls sideways.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        context.close()
