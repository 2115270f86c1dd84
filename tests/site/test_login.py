from django.contrib.auth.models import User


def test_a_person_logs_in_and_reaches_the_pages(page, live):
    User.objects.create_user("ada", password="correct horse battery")

    page.goto("/approvals/")
    assert "/accounts/login/" in page.url
    page.get_by_label("User name").fill("ada")
    page.get_by_label("Password").fill("correct horse battery")
    page.get_by_role("button", name="Log in").click()

    page.wait_for_url("**/approvals/")
    assert page.get_by_role("button", name="Log out ada").is_visible()


def test_a_wrong_password_is_refused(page, live):
    User.objects.create_user("ada", password="correct horse battery")

    page.goto("/accounts/login/")
    page.get_by_label("User name").fill("ada")
    page.get_by_label("Password").fill("wrong")
    page.get_by_role("button", name="Log in").click()

    assert page.get_by_role("alert").inner_text().startswith("Your user name and password did not match")
