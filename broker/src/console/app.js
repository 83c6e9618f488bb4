// The tether fleet console: plain JavaScript, no build step, nothing
// loaded from elsewhere. It reads the broker's admin API with the token the
// operator types in (kept in this tab's sessionStorage only); every value
// from the API is put into the page as text, never as HTML.
"use strict";

const PAGE_SIZE = 50;
// Rows of the route table shown at most: a fleet's full table (two routes
// per connected site) is filtered, not scrolled.
const ROUTE_ROWS = 500;
const REFRESH_MS = 2000;
const state = { token: sessionStorage.getItem("tether-token"), role: null, offset: 0, timer: null };

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    if (c instanceof Node) {
      const td = document.createElement("td");
      td.appendChild(c);
      tr.appendChild(td);
    } else if (c && typeof c === "object" && "num" in c) {
      tr.appendChild(el("td", c.num, "num"));
    } else {
      tr.appendChild(el("td", c === null || c === undefined ? "" : c));
    }
  }
  return tr;
}

function fill(tbody, rows, emptyText, columns) {
  tbody.replaceChildren(...rows);
  if (rows.length === 0) {
    const td = el("td", emptyText, "status");
    td.colSpan = columns;
    const tr = document.createElement("tr");
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Authorization": "Bearer " + state.token, ...(options.headers || {}) },
  });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : response.status + " " + response.statusText;
    if (response.status === 401) logout(message);
    throw new ApiError(response.status, message);
  }
  return body;
}

function ago(unix) {
  if (unix === null || unix === undefined) return "";
  const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  if (s < 86400) return Math.floor(s / 3600) + " h ago";
  return Math.floor(s / 86400) + " d ago";
}

function when(unix) {
  if (unix === null || unix === undefined) return "";
  return new Date(unix * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function until(unix) {
  if (unix === null || unix === undefined) return "";
  const s = Math.round(unix - Date.now() / 1000);
  const d = Math.floor(Math.abs(s) / 86400), h = Math.floor((Math.abs(s) % 86400) / 3600);
  const span = d > 0 ? d + " d " + h + " h" : h > 0 ? h + " h" : Math.floor(Math.abs(s) / 60) + " min";
  return s >= 0 ? "in " + span : "expired " + span + " ago";
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function badge(s) {
  return el("span", s, "badge " + s);
}

function siteLink(site) {
  const a = el("a", site);
  a.href = "#/site/" + encodeURIComponent(site);
  return a;
}

const REASONS = {
  revoked: "the site was revoked",
  replaced: "the site connected again (newer session)",
  certificate_expired: "the site's certificate expired",
  shutdown: "the broker shut down",
  connection_lost: "the connection was lost",
  site_closed: "the site closed its tunnel",
  protocol_error: "the site broke the tunnel protocol",
  path_black_hole: "the path stopped carrying full-size packets",
};

const PROBLEMS = {
  lan_refused: "a LAN prefix was refused",
  lan_mapping: "the LAN mappings cannot be used",
  translation: "packets from the tunnel or a LAN were dropped (not for the site, or not translatable)",
  device: "the tunnel device failed",
  mtu: "the path's MTU is too small",
  reload: "a configuration change was not applied",
  clock: "the site's clock is wrong",
  other: "a problem at the site",
};

function describe(e) {
  switch (e.kind) {
    case "connected": return "connected over " + e.transport + " from " + e.remote;
    case "disconnected":
      return "disconnected: " + (REASONS[e.reason] || e.reason) + (e.detail ? " (" + e.detail + ")" : "");
    case "enrolled": return "enrolled; certificate expires " + when(e.not_after);
    case "renewed": return "certificate renewed; expires " + when(e.not_after);
    case "reattested": return "re-attested with its key" + (e.not_after ? "; expires " + when(e.not_after) : "");
    case "revoked": return "revoked by the operator";
    case "readmitted": return "admitted again by the operator";
    case "reported":
      return "the site reports: " + (PROBLEMS[e.problem] || e.problem) + ": " + e.detail +
        (e.count > 1 ? " (" + e.count + " times)" : "");
    default: return e.kind;
  }
}

// ---- pages ----

function show(page) {
  for (const s of document.querySelectorAll("section.page")) s.hidden = s.id !== page;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
}

function schedule(fn) {
  clearTimeout(state.timer);
  state.timer = setTimeout(async () => {
    if (!document.hidden) {
      try { await fn(); } catch (_) { /* shown by fn */ }
    }
    schedule(fn);
  }, REFRESH_MS);
}

function siteQuery() {
  const p = new URLSearchParams();
  const q = $("site-q").value.trim(), st = $("site-state").value, r = $("site-region").value.trim(), since = $("site-since").value;
  if (q) p.set("q", q);
  if (st) p.set("state", st);
  if (r) p.set("region", r);
  if (since) p.set("since", since);
  p.set("offset", state.offset);
  p.set("limit", PAGE_SIZE);
  return p;
}

async function loadSites() {
  let page;
  try {
    page = await api("/v1/site-states?" + siteQuery());
  } catch (e) {
    $("sites-status").textContent = "Cannot load the sites: " + e.message;
    return;
  }
  const counts = $("counts");
  counts.replaceChildren(...Object.entries(page.counts).map(([k, v]) => {
    const s = el("span");
    s.append(badge(k), " " + v);
    s.dataset.state = k;
    return s;
  }));
  const rows = page.sites.map((s) => {
    const tr = row([
      siteLink(s.site), s.region, badge(s.state), ago(s.since),
      s.broker ? s.broker + (s.transport ? " / " + s.transport : "") : "",
      s.rtt_ms !== null && s.rtt_ms !== undefined ? { num: s.rtt_ms.toFixed(1) + " ms" } : "",
      s.addresses.join(", "),
      s.lans.map((l) => l.lan + " → " + l.mapped + (l.release_at ? " (unused, released " + when(l.release_at) + ")" : "")).join(", "),
      until(s.cert_not_after),
      { num: bytes(s.rx_bytes) + " / " + bytes(s.tx_bytes) },
      s.last_event ? describe(s.last_event) + " (" + ago(s.last_event.at) + ")" : "",
    ]);
    tr.dataset.site = s.site;
    tr.dataset.state = s.state;
    return tr;
  });
  fill($("sites-table").tBodies[0], rows, "No site matches.", 11);
  const last = Math.min(page.offset + page.sites.length, page.total);
  $("page-info").textContent = page.total === 0 ? "0 sites" : (page.offset + 1) + "–" + last + " of " + page.total;
  $("prev").disabled = page.offset === 0;
  $("next").disabled = last >= page.total;
  $("sites-status").textContent = "Updated " + new Date().toLocaleTimeString();
}

async function findSite(site) {
  const page = await api("/v1/site-states?" + new URLSearchParams({ q: site, limit: 500 }));
  return page.sites.find((s) => s.site === site) || null;
}

async function loadSite(site) {
  let summary, events, routes;
  try {
    [summary, events, routes] = await Promise.all([
      findSite(site),
      api("/v1/sites/" + encodeURIComponent(site) + "/events"),
      api("/v1/routes?" + new URLSearchParams({ site })),
    ]);
  } catch (e) {
    $("site-title").textContent = site;
    $("site-facts").replaceChildren(el("dd", "Cannot load the site: " + e.message, "error"));
    return;
  }
  $("site-title").replaceChildren(site + " ", summary ? badge(summary.state) : "");
  const facts = [];
  const add = (k, v) => { facts.push(el("dt", k)); const d = el("dd", v); d.dataset.fact = k; facts.push(d); };
  if (summary) {
    add("Region", summary.region);
    add("State", summary.state + (summary.since ? " since " + when(summary.since) + " (" + ago(summary.since) + ")" : ""));
    add("Broker", summary.broker || "");
    add("Transport", summary.transport || "");
    add("Remote address", summary.remote || "");
    add("RTT", summary.rtt_ms !== null && summary.rtt_ms !== undefined ? summary.rtt_ms.toFixed(1) + " ms" : "");
    add("Addresses", summary.addresses.join(", "));
    add("LANs", summary.lans.map((l) => l.lan + " → " + l.mapped + (l.release_at ? " (unused, released " + when(l.release_at) + ")" : "")).join(", "));
    add("Certificate expires", summary.cert_not_after ? when(summary.cert_not_after) + " (" + until(summary.cert_not_after) + ")" : "");
    add("Traffic in / out", bytes(summary.rx_bytes) + " / " + bytes(summary.tx_bytes));
  }
  $("site-facts").replaceChildren(...facts);
  const revoke = $("revoke");
  revoke.hidden = !(state.role === "admin" && summary && summary.state !== "revoked");
  revoke.dataset.site = site;
  revoke.dataset.region = summary ? summary.region : "";
  const rows = events.events.slice().reverse().map((e) => {
    const tr = row([when(e.at) + " (" + ago(e.at) + ")", e.kind, describe(e), e.broker]);
    tr.dataset.kind = e.kind;
    if (e.reason) tr.dataset.reason = e.reason;
    return tr;
  });
  fill($("events-table").tBodies[0], rows, "No events yet.", 4);
  fill($("site-routes").tBodies[0], routes.map((r) => row([r.prefix, r.kind, r.region])), "No routes.", 3);
}

async function revokeSite() {
  const b = $("revoke");
  const site = b.dataset.site, region = b.dataset.region;
  if (!confirm("Revoke site " + site + "? Its tunnel closes and its certificates stop working.")) return;
  try {
    const r = await api("/v1/sites/" + encodeURIComponent(region) + "/" + encodeURIComponent(site) + "/revoke", { method: "POST" });
    $("revoke-result").textContent = "Revoked" + (r.closed_session ? "; its tunnel was closed." : ".");
  } catch (e) {
    $("revoke-result").textContent = "Not revoked: " + e.message;
  }
  await loadSite(site);
}

async function loadRoutes() {
  const p = new URLSearchParams();
  for (const [k, id] of [["site", "route-site"], ["region", "route-region"], ["kind", "route-kind"], ["prefix", "route-prefix"]]) {
    const v = $(id).value.trim();
    if (v) p.set(k, v);
  }
  let routes;
  try {
    routes = await api("/v1/routes?" + p);
  } catch (e) {
    $("routes-status").textContent = "Cannot load the routes: " + e.message;
    return;
  }
  const rows = routes.slice(0, ROUTE_ROWS).map((r) => row([
    r.prefix, r.kind,
    r.target.type === "site" ? siteLink(r.target.id) : "gateway " + r.target.id,
    r.region,
  ]));
  fill($("routes-table").tBodies[0], rows, "No route matches.", 4);
  $("routes-status").textContent = routes.length + " routes" + (routes.length > ROUTE_ROWS
    ? "; the first " + ROUTE_ROWS + " are shown: filter by site, region, kind or prefix for the others"
    : "");
}

async function runTrace() {
  const target = $("trace-target").value.trim();
  if (!target) return;
  const p = new URLSearchParams();
  if ($("trace-from").value.trim()) p.set("from", $("trace-from").value.trim());
  if ($("trace-traffic").value.trim()) p.set("traffic", $("trace-traffic").value.trim());
  $("trace-error").textContent = "";
  const out = $("trace-result");
  out.replaceChildren();
  let t;
  try {
    t = await api("/v1/trace/" + encodeURIComponent(target) + "?" + p);
  } catch (e) {
    $("trace-error").textContent = e.message;
    return;
  }
  out.appendChild(el("p", (t.name && t.name !== t.query ? t.name + " — " : "") + t.query + ", answered by broker " + t.broker));
  for (const path of t.paths) {
    const box = el("div", null, "path");
    const x = path.explanation;
    box.appendChild(el("h2", x.destination));
    const dl = el("dl", null, "facts");
    const add = (k, v) => { dl.appendChild(el("dt", k)); const d = el("dd", v); d.dataset.fact = k; dl.appendChild(d); };
    if (x.winner) {
      add("Route", x.winner.prefix + " (" + x.winner.kind + ") → " + x.winner.target.type + " " + x.winner.target.id + ", region " + x.winner.region);
    } else {
      add("Route", "no route: packets to this address are dropped (a site's routes exist while it is connected)");
    }
    if (path.target) {
      const tg = path.target;
      if (tg.kind === "site") {
        add("Site", tg.id + (tg.session ? " — connected over " + tg.session.transport + " from " + tg.session.remote +
          ", RTT " + tg.session.rtt_ms.toFixed(1) + " ms" : " — not connected to this broker"));
      } else {
        add("Gateway", tg.id + (tg.gateway ? " (" + tg.gateway.kind + ")" : ""));
      }
      const denied = tg.residency.filter((r) => !r.permitted);
      add("Residency", denied.length === 0 ? "permitted" : "not permitted for " + denied.map((r) => r.gateway).join(", "));
    }
    if (path.lan) add("LAN host", path.lan.real + " on " + path.lan.mapping.real + " behind " + path.lan.site);
    if (path.policy) add("Policy", (path.policy.allowed ? "allowed: " : "denied: ") + path.policy.verdict);
    box.appendChild(dl);
    const cands = el("table");
    cands.appendChild(row(["Candidate", "Kind", "Target", "Verdict"]));
    for (const c of x.candidates) {
      cands.appendChild(row([c.route.prefix, c.route.kind, c.route.target.type + " " + c.route.target.id,
        typeof c.verdict === "string" ? c.verdict : Object.keys(c.verdict)[0]]));
    }
    box.appendChild(cands);
    out.appendChild(box);
  }
}

async function loadGateways() {
  let gws;
  try {
    gws = await api("/v1/gateways");
  } catch (e) {
    $("gateways-status").textContent = "Cannot load the gateways: " + e.message;
    return;
  }
  const rows = gws.map((g) => {
    const st = g.kind === "local" ? "up (on this broker)"
      : g.last_handshake_secs === null || g.last_handshake_secs === undefined ? "never heard"
      : g.last_handshake_secs <= 180 ? "up (handshake " + g.last_handshake_secs + " s ago)"
      : "silent for " + g.last_handshake_secs + " s";
    return row([g.id, g.region, g.kind, st, g.prefixes.join(", "), g.endpoint || "",
      { num: bytes(g.rx_bytes) + " / " + bytes(g.tx_bytes) }]);
  });
  fill($("gateways-table").tBodies[0], rows, "No gateways configured.", 7);
  $("gateways-status").textContent = gws.length + " gateways";
}

// ---- navigation and login ----

async function route() {
  clearTimeout(state.timer);
  if (!state.token) {
    $("nav").hidden = true;
    $("logout").hidden = true;
    $("who").textContent = "";
    show("login");
    return;
  }
  if (!state.role) {
    try {
      state.role = (await api("/v1/whoami")).role;
    } catch (e) {
      return;
    }
  }
  $("nav").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = "signed in as " + state.role;
  const hash = location.hash || "#/sites";
  const [, page, arg] = hash.split("/");
  switch (page) {
    case "site": {
      const site = decodeURIComponent(arg || "");
      show("site");
      $("revoke-result").textContent = "";
      await loadSite(site);
      schedule(() => loadSite(site));
      break;
    }
    case "routes": show("routes"); await loadRoutes(); break;
    case "trace": show("trace"); break;
    case "gateways": show("gateways"); await loadGateways(); schedule(loadGateways); break;
    default: show("sites"); await loadSites(); schedule(loadSites);
  }
}

function logout(message) {
  sessionStorage.removeItem("tether-token");
  state.token = null;
  state.role = null;
  clearTimeout(state.timer);
  $("login-error").textContent = message || "";
  route();
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  state.token = $("token").value.trim();
  state.role = null;
  $("login-error").textContent = "";
  try {
    state.role = (await api("/v1/whoami")).role;
  } catch (e) {
    $("login-error").textContent = "Not logged in: " + e.message;
    state.token = null;
    return;
  }
  sessionStorage.setItem("tether-token", state.token);
  $("token").value = "";
  if (!location.hash || location.hash === "#/login") location.hash = "#/sites"; else route();
});

$("logout").addEventListener("click", () => logout(""));

let typing = null;
function refilter() {
  clearTimeout(typing);
  typing = setTimeout(() => { state.offset = 0; loadSites(); }, 250);
}
$("site-q").addEventListener("input", refilter);
$("site-region").addEventListener("input", refilter);
$("site-state").addEventListener("change", refilter);
$("site-since").addEventListener("change", refilter);
$("site-filter").addEventListener("submit", (ev) => { ev.preventDefault(); refilter(); });
$("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE_SIZE); loadSites(); });
$("next").addEventListener("click", () => { state.offset += PAGE_SIZE; loadSites(); });
$("route-filter").addEventListener("submit", (ev) => { ev.preventDefault(); loadRoutes(); });
$("trace-form").addEventListener("submit", (ev) => { ev.preventDefault(); runTrace(); });
$("revoke").addEventListener("click", revokeSite);
window.addEventListener("hashchange", route);
route();
