"""The chat pages' scene for tests: the demo configuration as `make run` applies it (the scripted model, no
network; its tool calling the live server's /healthz), its people, and a person using the pages over HTTP
(logged in through the login form, posting forms with their CSRF token, reading the page's event stream)."""

import io
import json
import uuid
from dataclasses import dataclass

import httpx
from django.conf import settings as django_settings
from django.core.management import call_command

from core.models import Group, Team, Tool
from tests.approvals.test_pages import person

DEMO_GROUP = uuid.UUID("00000000-0000-4000-8000-000000000001")  # normal, with agents and the approval tool
DEMO_SYNTHESIS_GROUP = uuid.UUID("00000000-0000-4000-8000-000000000002")  # synthesis, agents only
STREAM = {"Accept": "text/event-stream"}


@dataclass
class ChatScene:
    team: Team
    group: Group  # demo
    synthesis: Group  # demo-synthesis


def chat_scene(live, settings) -> ChatScene:
    """config/demo.yaml applied; the demo tool calls the live server's /healthz (as `make run` lets it);
    people: mia (a member), abe (a member and an approver), otto (a member of another team)."""
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]
    call_command("apply_config", str(django_settings.BASE_DIR / "config" / "demo.yaml"), stdout=io.StringIO())
    team = Team.objects.get(name="demo")
    Tool.objects.filter(team=team, name="health_check").update(url=f"{live.url}/healthz")
    person("mia", team, approver=False)
    person("abe", team)
    person("otto", Team.objects.create(name="elsewhere"), approver=False)
    return ChatScene(
        team=team, group=Group.objects.get(pk=DEMO_GROUP), synthesis=Group.objects.get(pk=DEMO_SYNTHESIS_GROUP)
    )


class PagePerson:
    """Someone on the pages through httpx, logged in as `name` (person()'s password)."""

    def __init__(self, live, name: str) -> None:
        self.http = httpx.Client(base_url=live.url, timeout=30)
        self.http.get("/accounts/login/")
        logged_in = self.post("/accounts/login/", {"username": name, "password": f"pw-{name}-123456"})
        assert logged_in.status_code == 302, logged_in.text

    def post(self, url: str, data: dict, *, stream: bool = False) -> httpx.Response:
        data = {**data, "csrfmiddlewaretoken": self.http.cookies["csrftoken"]}
        return self.http.post(url, data=data, headers=STREAM if stream else {})

    def send(self, url: str, data: dict) -> list[dict]:
        """A message (or decision) posted for a stream: the page's events, in order."""
        response = self.post(url, data, stream=True)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        return page_events(response.text)

    def start(self, group: Group, mode: str, message: str) -> list[dict]:
        return self.send("/chat/send/", {"group": str(group.id), "mode": mode, "message": message})

    def close(self) -> None:
        self.http.close()


def page_events(text: str) -> list[dict]:
    return [json.loads(block.removeprefix("data: ")) for block in text.split("\n\n") if block.startswith("data: ")]


def answer_of(events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "text")
