#!/usr/bin/env python3
"""Watches the fleet console in a real Chromium (Debian's, through
Playwright) while a real agent (`tether up`) is killed with SIGKILL and
started again.

Run by netns-tests/tests/console.rs inside the broker's network namespace,
which says through the environment where things are:

  CONSOLE_URL   http://127.0.0.1:<admin port>/console/
  VIEWER_TOKEN  the broker's read-only token
  SITE          the site whose agent runs
  CHROMIUM      the browser (default /usr/bin/chromium)
  WAIT_MS       how long each wait for the page may take

The conversation on stdout and stdin, one line each:

  script: ONLINE     the site list shows the site online over HTTP/3
  test:   killed     the agent got SIGKILL
  script: OFFLINE    the list shows the site offline, "the connection was lost"
  test:   started    the agent runs again
  script: ONLINE     the list shows it online again
  script: OK         its timeline has both tunnels and the loss between

The test times each step itself. Any failed check raises (exit status 1)
with what was seen.
"""

import os
import sys

from playwright.sync_api import expect, sync_playwright

URL = os.environ["CONSOLE_URL"]
VIEWER = os.environ["VIEWER_TOKEN"]
SITE = os.environ["SITE"]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
WAIT_MS = int(os.environ.get("WAIT_MS", "60000"))


def say(word):
    print(word, flush=True)


def hear(expected):
    answer = sys.stdin.readline().strip()
    if answer != expected:
        raise SystemExit(f"expected {expected!r} from the test, got {answer!r}")


def main():
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        page.goto(URL)
        page.fill("#token", VIEWER)
        page.click("#login-form button[type=submit]")
        expect(page.locator("#who")).to_have_text("signed in as viewer", timeout=WAIT_MS)
        page.fill("#site-q", SITE)
        row = page.locator(f"#sites-table tr[data-site='{SITE}']")

        expect(row).to_have_attribute("data-state", "online", timeout=WAIT_MS)
        expect(row).to_contain_text("h3")
        say("ONLINE")

        # The page is left alone while the agent dies: it refreshes itself.
        hear("killed")
        expect(row).to_have_attribute("data-state", "offline", timeout=WAIT_MS)
        expect(row).to_contain_text("the connection was lost")
        say("OFFLINE")

        hear("started")
        expect(row).to_have_attribute("data-state", "online", timeout=WAIT_MS)
        expect(row).to_contain_text("h3")
        say("ONLINE")

        # The timeline, newest first: connected again, the loss, the
        # first tunnel.
        row.locator("a").first.click()
        kinds = page.locator("#events-table tbody tr")
        expect(kinds.first).to_have_attribute("data-kind", "connected", timeout=WAIT_MS)
        expect(kinds.nth(1)).to_have_attribute("data-kind", "disconnected")
        expect(kinds.nth(1)).to_have_attribute("data-reason", "connection_lost")
        expect(kinds.nth(2)).to_have_attribute("data-kind", "connected")
        expect(page.locator("#site-title .badge")).to_have_text("online")

        if errors:
            raise SystemExit(f"script errors in the page: {errors}")
        browser.close()
    say("OK")


if __name__ == "__main__":
    main()
