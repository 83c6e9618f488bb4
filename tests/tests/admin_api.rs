//! The admin API: authentication, errors that name the problem, and the
//! operator's CLI client against the real port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tether_proto::api::{SiteInfo, TokenRequest, TokenResponse};
use tether_shell::operator::AdminClient;
use tether_tests::TestBroker;
use tower::ServiceExt;

async fn call(
    broker: &TestBroker,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let app = tether_broker::admin::router(broker.broker().clone());
    let resp = app
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).to_string())
}

#[tokio::test]
async fn authentication_and_error_messages() {
    let broker = TestBroker::start("").await;
    let token = broker.broker().admin_token.clone();
    // Probes and metrics are open; the API is not.
    assert_eq!(
        call(&broker, "GET", "/healthz", None, "").await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&broker, "GET", "/readyz", None, "").await.0,
        StatusCode::OK
    );
    let (status, metrics) = call(&broker, "GET", "/metrics", None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains("tether_broker_packets_dropped_total"),
        "{metrics}"
    );
    for (method, path) in [
        ("GET", "/v1/sites"),
        ("GET", "/v1/routes"),
        ("POST", "/v1/tokens"),
    ] {
        let (status, body) = call(&broker, method, path, None, "{}").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(body.contains("admin token"), "{body}");
        assert_eq!(
            call(&broker, method, path, Some("wrong"), "{}").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    // The scheme is case-insensitive (RFC 9110 section 11.1).
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let req = Request::builder()
            .uri("/v1/sites")
            .header("authorization", format!("{scheme} {token}"))
            .body(Body::empty())
            .unwrap();
        let resp = tether_broker::admin::router(broker.broker().clone())
            .oneshot(req)
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{scheme}");
    }
    // A misspelt field is refused, not ignored.
    let (status, body) = call(
        &broker,
        "POST",
        "/v1/tokens",
        Some(&token),
        r#"{"site":"a","region":"local","tll":"1h"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("unknown field `tll`"), "{body}");
    // Bad JSON and bad values get 400 naming the problem.
    let (status, body) = call(&broker, "POST", "/v1/tokens", Some(&token), "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("invalid request body"), "{body}");
    let (status, body) = call(
        &broker,
        "POST",
        "/v1/tokens",
        Some(&token),
        r#"{"site":"Bad_Site","region":"local"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("site id"), "{body}");
    let (status, body) = call(
        &broker,
        "POST",
        "/v1/tokens",
        Some(&token),
        r#"{"site":"a","region":"mars"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("region mars is not configured"), "{body}");
    let (status, body) = call(
        &broker,
        "POST",
        "/v1/tokens",
        Some(&token),
        r#"{"site":"a","region":"local","ttl":"soon"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("ttl"), "{body}");
    let (status, _) = call(
        &broker,
        "POST",
        "/v1/sites/local/nobody/revoke",
        Some(&token),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = call(&broker, "GET", "/v1/trace/not-an-ip", Some(&token), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body.contains("neither an IP address nor a site name"),
        "{body}"
    );
    // Bad route filters name the filter.
    for (query, needle) in [
        ("kind=tunnel", "invalid kind"),
        ("prefix=100.64.0.0/99", "invalid prefix"),
        ("site=Bad_Site", "invalid site"),
        ("colour=blue", "invalid query"),
    ] {
        let (status, body) = call(
            &broker,
            "GET",
            &format!("/v1/routes?{query}"),
            Some(&token),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(body.contains(needle), "{query}: {body}");
    }
    let (status, _) = call(&broker, "GET", "/nowhere", Some(&token), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_cli_client_creates_tokens_over_the_real_port() {
    let broker = TestBroker::start("").await;
    let url = format!("http://{}", broker.running.as_ref().unwrap().admin_addr);
    let token = broker.broker().admin_token.clone();
    let (created, sites) = tokio::task::spawn_blocking(move || {
        let client = AdminClient::new(&url, &token);
        let created: TokenResponse = client
            .post(
                "/v1/tokens",
                &TokenRequest {
                    site: "lab-1".parse().unwrap(),
                    region: "local".parse().unwrap(),
                    ttl: Some("1h".into()),
                },
            )
            .unwrap();
        let sites: Vec<SiteInfo> = client.get("/v1/sites").unwrap();
        // A wrong admin token is refused with the status in the message.
        let wrong = AdminClient::new(&url, "nope")
            .get::<Vec<SiteInfo>>("/v1/sites")
            .unwrap_err();
        assert!(wrong.to_string().contains("HTTP 401"), "{wrong}");
        (created, sites)
    })
    .await
    .unwrap();
    assert!(created.code.starts_with("tt1-"));
    assert!(created.enroll_command.contains(&created.code));
    assert_eq!(sites.len(), 1);
    assert_eq!(sites[0].site.as_str(), "lab-1");
    assert!(!sites[0].enrolled);
}

#[tokio::test]
async fn the_viewer_token_reads_and_changes_nothing() {
    let broker = TestBroker::start("").await;
    let admin = broker.broker().admin_token.clone();
    let viewer = broker.broker().viewer_token().unwrap().to_string();
    assert_ne!(admin, viewer);
    broker.token("lab-1").await;
    for (token, role) in [(&admin, "admin"), (&viewer, "viewer")] {
        let (status, body) = call(&broker, "GET", "/v1/whoami", Some(token), "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(&format!("\"role\":\"{role}\"")), "{body}");
    }
    for path in [
        "/v1/sites",
        "/v1/routes",
        "/v1/site-states",
        "/v1/sites/lab-1/events",
    ] {
        let (status, body) = call(&broker, "GET", path, Some(&viewer), "").await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    for (method, path, body) in [
        ("POST", "/v1/sites/local/lab-1/revoke", ""),
        ("POST", "/v1/sites/local/lab-1/release", ""),
        ("POST", "/v1/tokens", r#"{"site":"lab-2","region":"local"}"#),
    ] {
        let (status, answer) = call(&broker, method, path, Some(&viewer), body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {answer}");
        assert!(answer.contains("viewer token can only read"), "{answer}");
    }
    // A backup (sealed CA keys, token hashes, certificates) is the admin's.
    let (status, answer) = call(&broker, "GET", "/v1/backup", Some(&viewer), "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert!(answer.contains("needs the admin token"), "{answer}");
    let (status, answer) = call(&broker, "GET", "/v1/backup", Some(&admin), "").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let record = broker
        .broker()
        .store
        .site(&"lab-1".parse().unwrap())
        .unwrap()
        .unwrap();
    assert!(!record.revoked);
    // The admin can, and the timeline says so.
    let (status, _) = call(
        &broker,
        "POST",
        "/v1/sites/local/lab-1/revoke",
        Some(&admin),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let b = broker.broker().clone();
    tokio::task::spawn_blocking(move || {
        assert!(b.events().flush(std::time::Duration::from_secs(10)))
    })
    .await
    .unwrap();
    let (_, events) = call(&broker, "GET", "/v1/sites/lab-1/events", Some(&viewer), "").await;
    assert!(events.contains(r#""kind":"revoked""#), "{events}");
    let (status, body) = call(&broker, "GET", "/v1/sites/nobody/events", Some(&viewer), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // The console's pages are open and load nothing from elsewhere.
    let (status, page) = call(&broker, "GET", "/console/", None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("app.js") && !page.contains("http"), "{page}");
}

#[tokio::test]
async fn the_site_list_filters_and_pages_on_the_broker() {
    let broker = TestBroker::start("").await;
    let token = broker.broker().admin_token.clone();
    for i in 0..12 {
        broker.token(&format!("ward-{i:02}")).await;
    }
    broker.token("lab-1").await;
    let page = |query: &'static str| {
        let (broker, token) = (&broker, token.clone());
        async move {
            let (status, body) = call(
                broker,
                "GET",
                &format!("/v1/site-states?{query}"),
                Some(&token),
                "",
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{query}: {body}");
            serde_json::from_str::<tether_proto::api::SitePage>(&body).unwrap()
        }
    };
    let all = page("").await;
    assert_eq!((all.total, all.sites.len()), (13, 13));
    assert_eq!(all.counts["offline"], 13);
    let wards = page("q=WARD&limit=5&offset=10").await;
    assert_eq!(wards.total, 12);
    let names: Vec<_> = wards.sites.iter().map(|s| s.site.to_string()).collect();
    assert_eq!(names, ["ward-10", "ward-11"]);
    assert_eq!(page("state=online").await.total, 0);
    assert_eq!(page("state=offline&q=lab").await.total, 1);
    // Created sites have no events yet: none changed within the hour.
    assert_eq!(page("since=1h").await.total, 0);
    let (status, body) = call(&broker, "GET", "/v1/site-states?state=up", Some(&token), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body.contains("online, offline, flapping or revoked"),
        "{body}"
    );
}

#[tokio::test]
async fn the_openapi_document_describes_every_endpoint() {
    let broker = TestBroker::start("").await;
    let (status, body) = call(&broker, "GET", "/openapi.json", None, "").await;
    assert_eq!(status, StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    // Every path of the router is documented, and every documented path
    // exists (answers something other than the router's 404).
    let token = broker.broker().admin_token.clone();
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let concrete = path
                .replace("{region}", "local")
                .replace("{site}", "nobody")
                .replace("{target}", "127.0.0.1");
            let (status, body) = call(
                &broker,
                &method.to_uppercase(),
                &concrete,
                Some(&token),
                "{}",
            )
            .await;
            assert!(
                !body.contains("no such endpoint"),
                "{method} {path} is documented but not served ({status})"
            );
        }
    }
    for served in [
        "/v1/sites",
        "/v1/sessions",
        "/v1/routes",
        "/v1/gateways",
        "/v1/tokens",
        "/v1/sites/{region}/{site}/revoke",
        "/v1/sites/{region}/{site}/release",
        "/v1/trace/{target}",
        "/v1/policy",
        "/v1/site-states",
        "/v1/sites/{site}/events",
        "/v1/whoami",
        "/v1/ca",
        "/v1/ca/rotate",
        "/v1/ca/rollback",
        "/v1/backup",
        "/metrics",
        "/healthz",
        "/readyz",
        "/openapi.json",
    ] {
        assert!(paths.contains_key(served), "{served} is not documented");
    }
    // The session list is the fleet's: each row names the broker holding
    // it, and whether it is this one.
    let items = |path: &str| {
        doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
            ["items"]["$ref"]
            .clone()
    };
    assert_eq!(items("/v1/sessions"), "#/components/schemas/FleetSession");
    assert_eq!(items("/v1/routes"), "#/components/schemas/RouteInfo");
    let fleet_session = &doc["components"]["schemas"]["FleetSession"];
    for field in ["site", "region", "broker", "local"] {
        assert!(
            fleet_session["required"]
                .as_array()
                .unwrap()
                .contains(&field.into()),
            "FleetSession requires {field}"
        );
    }
    for (schema, field) in [
        ("SiteInfo", "broker"),
        ("RouteInfo", "broker"),
        ("TracePath", "peer"),
    ] {
        assert_eq!(
            doc["components"]["schemas"][schema]["properties"][field]["$ref"],
            "#/components/schemas/BrokerRef",
            "{schema}.{field}"
        );
    }
    // Every schema reference resolves.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for r in body.split("\"$ref\": \"#/components/schemas/").skip(1) {
        let name = r.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "dangling $ref {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_filter_and_trace_explains_a_name() {
    let broker = TestBroker::start("").await;
    let token = broker.broker().admin_token.clone();
    let site = tether_tests::TestSite::enroll(&broker, "hospital-a").await;
    let (chain, key, ca) = site.identity();
    let client = tether_tests::connect(broker.addr(), &ca, Some((chain, key)))
        .await
        .unwrap();
    let mut tunnel = tether_tests::Tunnel::open(client).await.unwrap();
    tunnel.configured().await;
    let address = broker
        .broker()
        .host_addresses(&"hospital-a".parse().unwrap(), &"local".parse().unwrap())
        .into_iter()
        .find(|a| a.is_ipv4())
        .unwrap();
    // Routes filtered by site, kind and prefix.
    let (status, body) = call(
        &broker,
        "GET",
        "/v1/routes?site=hospital-a",
        Some(&token),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let routes: Vec<tether_proto::route::Route> = serde_json::from_str(&body).unwrap();
    assert!(!routes.is_empty());
    assert!(
        routes
            .iter()
            .all(|r| r.target.to_string() == "site hospital-a")
    );
    let (_, body) = call(
        &broker,
        "GET",
        &format!("/v1/routes?kind=site-address&prefix={address}"),
        Some(&token),
        "",
    )
    .await;
    let routes: Vec<tether_proto::route::Route> = serde_json::from_str(&body).unwrap();
    assert_eq!(routes.len(), 1, "{body}");
    let (_, body) = call(
        &broker,
        "GET",
        "/v1/routes?region=elsewhere",
        Some(&token),
        "",
    )
    .await;
    assert_eq!(body, "[]");

    // Trace by name: the decision, the site, its session on this broker.
    let mut trace = None;
    for _ in 0..50 {
        let (status, body) = call(
            &broker,
            "GET",
            "/v1/trace/hospital-a.local.tether.internal",
            Some(&token),
            "",
        )
        .await;
        if status == StatusCode::OK {
            trace = Some(serde_json::from_str::<tether_proto::api::Trace>(&body).unwrap());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let trace = trace.expect("trace by name");
    assert_eq!(
        trace.name.as_deref(),
        Some("hospital-a.local.tether.internal")
    );
    assert_eq!(trace.broker, broker.addr().to_string());
    let v4 = trace
        .paths
        .iter()
        .find(|p| p.explanation.destination == address)
        .unwrap();
    let target = v4.target.as_ref().unwrap();
    assert_eq!(
        (target.kind.as_str(), target.id.as_str()),
        ("site", "hospital-a")
    );
    let session = target.session.as_ref().expect("session shown");
    assert_eq!(session.transport, "h3");
    assert!(session.rtt_ms >= 0.0);
    // The QUIC path under it, as the broker sends: packets went out (the
    // handshake, the response, the address), a window to send in, and a
    // queue within the connection's datagram buffer.
    let path = session.path.expect("an HTTP/3 session shows its path");
    assert!(path.sent_packets > 0, "{path:?}");
    assert!(path.lost_packets <= path.sent_packets, "{path:?}");
    assert!(path.cwnd_bytes >= 1200, "{path:?}");
    assert!(
        path.queued_bytes <= tether_shell::quic::DATAGRAM_SEND_BUFFER as u64,
        "{path:?}"
    );
    assert!(!v4.explanation.candidates.is_empty());
    let text = tether_shell::operator::trace_text(&trace);
    assert!(text.contains("via site hospital-a"), "{text}");
    assert!(text.contains("over h3"), "{text}");
    assert!(text.contains("  path      min rtt "), "{text}");
    assert!(tether_shell::operator::trace_routed(&trace));
    drop(tunnel);
}

#[tokio::test]
async fn trace_asks_the_access_policy_and_the_policy_is_shown() {
    let broker = TestBroker::start(
        r#"
[policy.groups]
labs = ["lab-1", "lab-2"]

[[policy.allow]]
name = "labs-share-results"
from = ["group:labs"]
to = ["group:labs"]
ports = ["tcp/443"]
"#,
    )
    .await;
    let token = broker.broker().admin_token.clone();
    let mut tunnels = Vec::new();
    for name in ["lab-1", "lab-2", "hospital-c"] {
        let site = tether_tests::TestSite::enroll(&broker, name).await;
        let (chain, key, ca) = site.identity();
        let client = tether_tests::connect(broker.addr(), &ca, Some((chain, key)))
            .await
            .unwrap();
        let mut tunnel = tether_tests::Tunnel::open(client).await.unwrap();
        tunnel.configured().await;
        tunnels.push(tunnel);
    }
    let v4 = |site: &str| {
        broker
            .broker()
            .host_addresses(&site.parse().unwrap(), &"local".parse().unwrap())
            .into_iter()
            .find(|a| a.is_ipv4())
            .unwrap()
    };
    let ask = |from: std::net::IpAddr, to: std::net::IpAddr, traffic: &str| {
        format!("/v1/trace/{to}?from={from}&traffic={traffic}")
    };
    let policy_of = |body: &str| -> tether_proto::api::PolicyCheck {
        let trace: tether_proto::api::Trace = serde_json::from_str(body).unwrap();
        trace.paths[0].policy.clone().expect("a policy verdict")
    };
    // Allowed, by the rule named.
    let (status, body) = call(
        &broker,
        "GET",
        &ask(v4("lab-1"), v4("lab-2"), "tcp/443"),
        Some(&token),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let check = policy_of(&body);
    assert!(check.allowed, "{check:?}");
    assert_eq!(check.rule.as_deref(), Some("labs-share-results"));
    assert_eq!(check.sender, "site lab-1");
    // Another port, another site: denied, and the text says why.
    for (from, traffic) in [("lab-1", "tcp/22"), ("hospital-c", "tcp/443")] {
        let (_, body) = call(
            &broker,
            "GET",
            &ask(v4(from), v4("lab-2"), traffic),
            Some(&token),
            "",
        )
        .await;
        let check = policy_of(&body);
        assert!(!check.allowed, "{from} {traffic}: {check:?}");
        assert!(check.verdict.contains("default deny"), "{check:?}");
    }
    // The CLI's text shows it too.
    let (_, body) = call(
        &broker,
        "GET",
        &ask(v4("hospital-c"), v4("lab-2"), "tcp/443"),
        Some(&token),
        "",
    )
    .await;
    let trace: tether_proto::api::Trace = serde_json::from_str(&body).unwrap();
    let text = tether_shell::operator::trace_text(&trace);
    assert!(text.contains("policy    tcp/443 from"), "{text}");
    assert!(!tether_shell::operator::trace_routed(&trace));
    // Bad traffic is refused with the fix.
    let (status, body) = call(
        &broker,
        "GET",
        &ask(v4("lab-1"), v4("lab-2"), "tcp"),
        Some(&token),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("tcp/443"), "{body}");
    // The policy as loaded.
    let (status, body) = call(&broker, "GET", "/v1/policy", Some(&token), "").await;
    assert_eq!(status, StatusCode::OK);
    let policy: tether_proto::api::PolicyInfo = serde_json::from_str(&body).unwrap();
    assert_eq!(policy.backends, "region");
    assert_eq!(policy.groups["labs"], vec!["lab-1", "lab-2"]);
    assert_eq!(policy.rules[0].ports, vec!["tcp/443"]);
    drop(tunnels);
}

#[tokio::test]
async fn metrics_can_be_put_behind_the_admin_token() {
    // Continues the harness's [admin] table.
    let broker =
        TestBroker::start("metrics_require_token = true\n[dns]\nlisten = [\"127.0.0.1:0\"]\n")
            .await;
    let (status, body) = call(&broker, "GET", "/metrics", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("metrics_require_token"), "{body}");
    let token = broker.broker().admin_token.clone();
    let (status, body) = call(&broker, "GET", "/metrics", Some(&token), "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("tether_broker_"), "{body}");
    // Probes stay open.
    let (status, _) = call(&broker, "GET", "/healthz", None, "").await;
    assert_eq!(status, StatusCode::OK);
}
