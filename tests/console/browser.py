#!/usr/bin/env python3
"""Drives the broker's fleet console in a real Chromium (Debian's, through
Playwright, which downloads no browser of its own here).

Run by tests/tests/console.rs, which starts the broker and the site's agent
and tells this script through the environment where they are:

  CONSOLE_URL   http://127.0.0.1:<admin port>/console/
  ADMIN_TOKEN   the broker's admin token
  VIEWER_TOKEN  the broker's read-only token
  SITE          the enrolled, connected site
  SITE_NAME     its name in the mesh zone
  GATEWAY       a gateway the broker is configured with
  SHOTS         directory for screenshots of the main pages
  CHROMIUM      the browser (default /usr/bin/chromium)

Half way it prints "KILL" and waits for a line on stdin: the test then
kills the site's agent and answers. It prints "OK" when every check passed;
any failed check raises (exit status 1) with what was seen.
"""

import os
import sys

from playwright.sync_api import expect, sync_playwright

URL = os.environ["CONSOLE_URL"]
ADMIN = os.environ["ADMIN_TOKEN"]
VIEWER = os.environ["VIEWER_TOKEN"]
SITE = os.environ["SITE"]
NAME = os.environ["SITE_NAME"]
SHOTS = os.environ["SHOTS"]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Each wait for the page; the console refreshes every 2 s.
WAIT_MS = 20_000


def shot(page, name):
    page.screenshot(path=os.path.join(SHOTS, name), full_page=True)


def log_in(page, token, role):
    page.goto(URL)
    expect(page.locator("#login")).to_be_visible(timeout=WAIT_MS)
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#who")).to_have_text("signed in as " + role, timeout=WAIT_MS)


def main():
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        outside = []
        # Nothing but the broker may be asked for anything.
        page.on(
            "request",
            lambda r: None if r.url.startswith(URL.split("/console/")[0]) or r.url.startswith("data:")
            else outside.append(r.url),
        )
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        # A wrong token is refused in words.
        page.goto(URL)
        page.fill("#token", "not-the-token")
        page.click("#login-form button[type=submit]")
        expect(page.locator("#login-error")).to_contain_text("wrong admin token", timeout=WAIT_MS)

        # The admin sees the enrolled site online, over HTTP/3.
        log_in(page, ADMIN, "admin")
        row = page.locator(f"#sites-table tr[data-site='{SITE}']")
        expect(row).to_have_attribute("data-state", "online", timeout=WAIT_MS)
        expect(row).to_contain_text("h3")
        expect(page.locator("#counts [data-state=online]")).to_contain_text("1")
        # The search runs on the server: a word no site has leaves none.
        page.fill("#site-q", "no-such-site-anywhere")
        expect(page.locator("#sites-table tbody")).to_contain_text("No site matches", timeout=WAIT_MS)
        page.fill("#site-q", SITE)
        expect(row).to_be_visible(timeout=WAIT_MS)
        shot(page, "sites.png")

        # Its timeline says it connected; the admin may revoke it.
        row.locator("a").first.click()
        expect(page.locator("#events-table tr[data-kind=connected]").first).to_be_visible(timeout=WAIT_MS)
        expect(page.locator("#events-table tr[data-kind=enrolled]")).to_have_count(1)
        # A problem its agent reported is there too, in plain words.
        reported = page.locator("#events-table tr[data-kind=reported]")
        expect(reported).to_have_count(1)
        expect(reported).to_contain_text(
            "the site reports: a LAN prefix was refused: the broker denied a mapping for the LAN 10.9.0.0/16"
        )
        expect(reported).to_contain_text("(2 times)")
        expect(page.locator("#revoke")).to_be_visible()

        # Its name traces to its tunnel.
        page.click("#nav a[data-page=trace]")
        page.fill("#trace-target", NAME)
        page.click("#trace-form button[type=submit]")
        result = page.locator("#trace-result")
        expect(result).to_contain_text(NAME, timeout=WAIT_MS)
        site_fact = result.locator("[data-fact=Site]").first
        expect(site_fact).to_contain_text(SITE)
        expect(site_fact).to_contain_text("connected over h3")
        shot(page, "trace.png")

        # The route table has the site's addresses and the gateway's
        # backend network; the gateway is listed.
        page.click("#nav a[data-page=routes]")
        routes = page.locator("#routes-table tbody")
        expect(routes).to_contain_text(SITE, timeout=WAIT_MS)
        expect(routes).to_contain_text("gateway " + os.environ["GATEWAY"])
        shot(page, "routes.png")
        page.click("#nav a[data-page=gateways]")
        expect(page.locator("#gateways-table tbody")).to_contain_text(os.environ["GATEWAY"], timeout=WAIT_MS)
        shot(page, "gateways.png")

        page.goto(URL + "#/site/" + SITE)
        expect(page.locator("#events-table tr[data-kind=connected]").first).to_be_visible(timeout=WAIT_MS)

        # The agent goes away.
        print("KILL", flush=True)
        answer = sys.stdin.readline().strip()
        if answer != "killed":
            raise SystemExit(f"expected 'killed' from the test, got {answer!r}")

        lost = page.locator("#events-table tr[data-kind=disconnected][data-reason=connection_lost]")
        expect(lost.first).to_be_visible(timeout=WAIT_MS)
        expect(lost.first).to_contain_text("the connection was lost")
        expect(page.locator("#site-title .badge")).to_have_text("offline", timeout=WAIT_MS)
        shot(page, "site.png")
        page.click("#nav a[data-page=sites]")
        page.fill("#site-q", "")
        expect(row).to_have_attribute("data-state", "offline", timeout=WAIT_MS)
        expect(row).to_contain_text("the connection was lost")

        # Its name traces to nothing now: a site's routes live with its
        # tunnel.
        page.click("#nav a[data-page=trace]")
        page.fill("#trace-target", NAME)
        page.click("#trace-form button[type=submit]")
        result = page.locator("#trace-result")
        expect(result).to_contain_text(NAME, timeout=WAIT_MS)
        expect(result.locator("[data-fact=Route]").first).to_contain_text("no route")

        # Its routes went with its tunnel.
        page.click("#nav a[data-page=routes]")
        page.fill("#route-site", SITE)
        page.click("#route-filter button[type=submit]")
        expect(page.locator("#routes-status")).to_have_text("0 routes", timeout=WAIT_MS)

        # A viewer sees the site but has no revoke button, and the API
        # refuses the viewer's revocation.
        page.click("#logout")
        log_in(page, VIEWER, "viewer")
        page.goto(URL + "#/site/" + SITE)
        expect(page.locator("#events-table tr[data-kind=disconnected]").first).to_be_visible(timeout=WAIT_MS)
        expect(page.locator("#revoke")).to_be_hidden()
        status = page.evaluate(
            """async ([token, site]) => {
                const s = await (await fetch('/v1/site-states?q=' + site, {headers: {Authorization: 'Bearer ' + token}})).json();
                const region = s.sites[0].region;
                const r = await fetch('/v1/sites/' + region + '/' + site + '/revoke',
                    {method: 'POST', headers: {Authorization: 'Bearer ' + token}});
                return [r.status, (await r.json()).error];
            }""",
            [VIEWER, SITE],
        )
        if status[0] != 403 or "viewer token can only read" not in status[1]:
            raise SystemExit(f"a viewer's revocation was answered {status}")

        if outside:
            raise SystemExit(f"the console asked for outside resources: {outside}")
        if errors:
            raise SystemExit(f"script errors in the page: {errors}")
        browser.close()
    print("OK", flush=True)


if __name__ == "__main__":
    main()
