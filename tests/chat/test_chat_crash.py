"""A chat turn whose server process is killed (SIGKILL) mid-answer (SPEC §7 for people): a new process on the
same database finds the conversation, the turn shown as interrupted with what the run's recovery settled,
nothing held, and the conversation goes on. Nothing but the database connects the processes."""

import time

import httpx
from django.contrib.auth.hashers import PBKDF2PasswordHasher, make_password

from billing.models import CreditAccount, Hold
from core.models import Execution
from tests.approvals.test_pages import person
from tests.conftest import Setup, make_setup
from tests.support.chat import PagePerson, answer_of
from tests.support.server_process import LEASE_SECONDS
from tests.support.upstream import FakeUpstream, Reply


def test_a_turn_killed_mid_answer_reloads_as_interrupted_with_nothing_held(
    transactional_db, upstream: FakeUpstream, servers
):
    setup: Setup = make_setup(upstream)
    mia = person("mia", setup.team, approver=False)
    # The server process hashes as production does (the test settings' fast hasher is not among its hashers).
    mia.password = make_password("pw-mia-123456", hasher=PBKDF2PasswordHasher())
    mia.save(update_fields=["password"])
    balance = CreditAccount.objects.get(team=setup.team).balance
    upstream.queue(Reply(chunks=["one ", "two ", "three "] * 20, chunk_delay=0.1))
    server_a = servers()
    mia = PagePerson(server_a, "mia")
    data = {"group": str(setup.group.id), "mode": "normal", "message": "Count"}
    data["csrfmiddlewaretoken"] = mia.http.cookies["csrftoken"]

    with mia.http.stream("POST", "/chat/send/", data=data, headers={"Accept": "text/event-stream"}) as response:
        lines = response.iter_lines()
        url = next(line for line in lines if '"type": "run"' in line).split('"url": "')[1].split('"')[0]
        while '"type": "text"' not in next(lines):
            pass
        server_a.kill()
    time.sleep(LEASE_SECONDS * 1.5)
    server_b = servers()
    mia = PagePerson(server_b, "mia")

    page = mia.http.get(url)  # reading the conversation recovers its lapsed run

    assert page.status_code == 200
    assert "Count" in page.text and "Normal run: interrupted" in page.text
    execution = Execution.objects.get()
    assert (execution.status, execution.error["code"]) == (Execution.Status.FAILED, "run_interrupted")
    assert not Hold.objects.filter(status=Hold.Status.ACTIVE).exists()
    assert CreditAccount.objects.get(team=setup.team).balance == balance  # the brain's call never completed
    upstream.queue(Reply(chunks=["Still ", "here."]))
    again = mia.send(f"{url}send/", {"message": "Again"})
    assert answer_of(again) == "Still here." and again[-1]["state"] == "completed"
    with httpx.Client(base_url=server_b.url) as anonymous:
        assert anonymous.get(url).status_code == 302  # to the login page
