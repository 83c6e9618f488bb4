#!/usr/bin/env python3
"""Times the fleet console's pages in headless Chromium (Debian's, through
Playwright) against a broker holding many sites: run by `tether-bench
--console` inside the broker's network namespace.

  CONSOLE_URL   http://127.0.0.1:<admin port>/console/
  TOKEN         the viewer token
  SEARCH        a connected site's id, to search for and open
  SEARCH_ROWS   how many sites the search matches (ids are matched as
                substrings: load-999 is in load-9990)
  ROUNDS        page loads to time
  CHROMIUM      the browser (default /usr/bin/chromium)

Prints one line per measurement:

  RESULT <name> <milliseconds> <what was on the page>

Times are the page's own clock (performance.now(), from the start of the
navigation, or from the action) at the first animation frame where the
page's readiness marker holds: the site table's rows and its "Updated"
status, the route table's "N routes" status, a site's timeline rows.
"""

import os
import statistics

from playwright.sync_api import sync_playwright

URL = os.environ["CONSOLE_URL"]
TOKEN = os.environ["TOKEN"]
SEARCH = os.environ["SEARCH"]
SEARCH_ROWS = int(os.environ["SEARCH_ROWS"])
ROUNDS = int(os.environ.get("ROUNDS", "5"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
WAIT_MS = 120_000

# The site list is ready: its status says "Updated" and the rows are in.
SITES_READY = """(want) => {
  const s = document.getElementById('sites-status').textContent;
  const rows = document.querySelectorAll('#sites-table tbody tr[data-site]').length;
  return s.startsWith('Updated') && rows >= want ? [performance.now(), rows] : false;
}"""


def result(name, ms, what):
    print(f"RESULT {name} {ms:.1f} {what}", flush=True)


def fetch_ms(page, path):
    """Durations of the page's requests to `path` (resource timing)."""
    return page.evaluate(
        """(path) => performance.getEntriesByType('resource')
            .filter((e) => new URL(e.name).pathname === path)
            .map((e) => [e.duration, e.responseStart - e.requestStart, e.transferSize])""",
        path,
    )


def main():
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        loads, renders = [], []
        for _ in range(ROUNDS):
            context = browser.new_context(viewport={"width": 1400, "height": 800})
            page = context.new_page()
            page.goto(URL)
            page.evaluate("(t) => sessionStorage.setItem('tether-token', t)", TOKEN)
            # A fresh navigation with the token: login state, whoami, the
            # first page of sites, its rows.
            page.reload()
            ready, rows = page.wait_for_function(SITES_READY, arg=50, timeout=WAIT_MS,
                                                 polling="raf").json_value()
            loads.append(ready)
            timing = fetch_ms(page, "/v1/site-states")
            renders.append(timing[0][0])
            result("first-page-load", ready, f"{rows} rows, counts "
                   + page.locator("#counts").inner_text().replace("\n", " "))
            context.close()
        result("first-page-load-median", statistics.median(loads), f"over {ROUNDS} loads")
        result("site-states-fetch-median", statistics.median(renders),
               "the page's request, from resource timing")

        context = browser.new_context(viewport={"width": 1400, "height": 800})
        page = context.new_page()
        page.goto(URL)
        page.evaluate("(t) => sessionStorage.setItem('tether-token', t)", TOKEN)
        page.reload()
        page.wait_for_function(SITES_READY, arg=50, timeout=WAIT_MS, polling="raf")

        # Search: one site out of all (includes the page's 250 ms pause
        # after typing).
        start = page.evaluate("performance.now()")
        page.fill("#site-q", SEARCH)
        done = page.wait_for_function(
            """([site, want]) => {
              const rows = [...document.querySelectorAll('#sites-table tbody tr[data-site]')];
              return rows.length === want && rows.some((r) => r.dataset.site === site)
                ? performance.now() : false;
            }""",
            arg=[SEARCH, min(SEARCH_ROWS, 50)], timeout=WAIT_MS, polling="raf").json_value()
        result("search", done - start,
               f"{SEARCH}: {SEARCH_ROWS} rows, with the page's 250 ms typing pause")
        page.fill("#site-q", "")
        page.wait_for_function(SITES_READY, arg=50, timeout=WAIT_MS, polling="raf")

        # The last page.
        info = page.locator("#page-info").inner_text()
        total = int(info.split(" of ")[1])
        start = page.evaluate("performance.now()")
        page.evaluate(
            """(total) => { state.offset = Math.floor((total - 1) / 50) * 50; loadSites(); }""", total)
        done = page.wait_for_function(
            """(total) => document.getElementById('page-info').textContent.endsWith('–' + total + ' of ' + total)
                ? performance.now() : false""",
            arg=total, timeout=WAIT_MS, polling="raf").json_value()
        result("last-page", done - start, page.locator("#page-info").inner_text())

        # One site's page: its facts (a search of the list) and timeline.
        start = page.evaluate("performance.now()")
        page.evaluate("(s) => { location.hash = '#/site/' + s; }", SEARCH)
        done = page.wait_for_function(
            """() => document.querySelector('#site-title .badge') &&
                document.querySelectorAll('#events-table tbody tr[data-kind]').length > 0
                ? performance.now() : false""",
            timeout=WAIT_MS, polling="raf").json_value()
        result("site-page", done - start, SEARCH)

        # The route table, unfiltered, as the page opens.
        start = page.evaluate("performance.now()")
        page.click("#nav a[data-page=routes]")
        done, status = page.wait_for_function(
            """() => { const s = document.getElementById('routes-status').textContent;
                return / routes?/.test(s) ? [performance.now(), s] : false; }""",
            timeout=WAIT_MS, polling="raf").json_value()
        rows = page.locator("#routes-table tbody tr").count()
        timing = fetch_ms(page, "/v1/routes")
        result("routes-page", done - start,
               f"{status}; {rows} rows in the table; request {timing[-1][0]:.1f} ms, {timing[-1][2]} bytes")
        # Every route rendered into the table, as the page did before it
        # showed at most 500: from the rows' creation to the next frame.
        ms, rows = page.evaluate("""async () => {
            const routes = await api("/v1/routes");
            const t0 = performance.now();
            const rows = routes.map((r) => row([r.prefix, r.kind,
              r.target.type === "site" ? siteLink(r.target.id) : "gateway " + r.target.id, r.region]));
            fill($("routes-table").tBodies[0], rows, "", 4);
            void document.body.offsetHeight;
            await new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)));
            return [performance.now() - t0, rows.length];
        }""")
        result("routes-render-all", ms, f"{rows} rows rendered, without the page's limit")
        context.close()
        browser.close()


if __name__ == "__main__":
    main()
