"""The pages' Content-Security-Policy (issue 20, "safe by default"): every page names only this origin,
its inline blocks carry the response's nonce, and the API carries no policy (it answers JSON)."""

import re

from django.contrib.auth.models import Permission, User


def test_pages_allow_only_this_origin_and_their_own_nonced_inline_blocks(live, http):
    user = User.objects.create_user("ada", password="correct horse battery")
    user.user_permissions.add(Permission.objects.get(codename="decide_approval"))
    login = http.get("/accounts/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text)[1]
    http.post(
        "/accounts/login/", data={"csrfmiddlewaretoken": token, "username": "ada", "password": "correct horse battery"}
    )

    page = http.get("/approvals/")

    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    nonce = re.search(r"'nonce-([^']+)'", policy["script-src"])[1]
    assert policy["default-src"] == "'self'" and policy["object-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    inline = re.findall(r"<(script|style)([^>]*)>", page.text)
    assert inline and all(f'nonce="{nonce}"' in attributes for _, attributes in inline)
    assert " style=" not in page.text and " onclick=" not in page.text


def test_the_api_answers_without_a_policy(live, http):
    assert "content-security-policy" not in http.get("/v1/models").headers
