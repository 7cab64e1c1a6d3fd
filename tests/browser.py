"""Headless Debian Chromium driven by Playwright (it cannot download its own browser here)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def log_in(context: Any, url: str, username: str, password: str, path: str = "/") -> Any:
    """A page of CONTEXT signed in through trackgate's login page (where asking for PATH leads),
    left on the page it lands on."""
    page = context.new_page()
    for attempt in (1, 2):
        page.goto(url + path, timeout=120_000)
        if attempt == 2 and "/login" not in page.url:
            return page  # the first post was answered after all: signed in
        page.wait_for_url("**/login?**", timeout=60_000)
        page.fill("#username", username)
        page.fill("#password", password)
        page.click("button[type=submit]")
        try:
            # bcrypt runs at the lowest CPU priority: on a busy machine a first login can wait.
            page.wait_for_url(lambda u: "/login" not in u, timeout=120_000)
        except Exception:  # say what the login page says (wrong password, throttled...)
            raise AssertionError(f"login as {username} failed: {page.inner_text('body')}") \
                from None
        if page.url.startswith(url):
            return page
        # Chromium's own error page (chrome-error://): the form post never got an answer (the
        # connection dropped on a loaded machine). A person presses the button again; so do we,
        # once -- a second drop fails the test.
        print(f"log_in: the login post for {username} ended on {page.url}; trying again")
    raise AssertionError(f"login as {username} never got an answer: the browser is on {page.url}")
