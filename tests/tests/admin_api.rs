//! The admin API: authentication, errors that name the problem, and the
//! operator's CLI client against the real port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tether_broker::admin_client::AdminClient;
use tether_proto::api::{SiteInfo, TokenRequest, TokenResponse};
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
    let (status, _) = call(&broker, "GET", "/v1/trace/not-an-ip", Some(&token), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
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
