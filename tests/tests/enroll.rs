//! Enrollment with a broker name the broker's certificate does not carry
//! says so, and which names it does carry; enrollment on the agent's first
//! start from a code in a file or the environment (a Kubernetes Secret).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tether::enroll::{EnrollmentRefused, FirstStart, enroll_on_first_start};
use tether::state_dir::StateDir;
use tether_tests::TestBroker;

#[tokio::test]
async fn a_name_not_advertised_is_named_with_the_ones_that_are() {
    // The test broker advertises only 127.0.0.1; localhost reaches it too.
    let broker = TestBroker::start("").await;
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("state"));
    let code = broker.token("site-name").await;
    let by_name = format!("localhost:{}", broker.addr().port());
    let err = tether::enroll::enroll(&by_name, &code, &state, false, None)
        .await
        .expect_err("localhost is not in the broker's certificate");
    let text = format!("{err:#}");
    assert!(
        text.contains("localhost is not a name this broker serves"),
        "{text}"
    );
    assert!(text.contains("its certificate names 127.0.0.1"), "{text}");
    assert!(!state.is_enrolled());

    // The advertised address enrolls.
    tether::enroll::enroll(&broker.addr().to_string(), &code, &state, false, None)
        .await
        .unwrap();
}

/// Creates a token through the broker's own path (as `tether-broker token
/// create` does), with `ttl`.
async fn token_with_ttl(broker: &TestBroker, site: &str, ttl: &str) -> String {
    let b = broker.broker().clone();
    let (site, ttl) = (site.parse().unwrap(), ttl.to_string());
    tokio::task::spawn_blocking(move || {
        b.create_token(&site, &"local".parse().unwrap(), Some(&ttl))
    })
    .await
    .unwrap()
    .unwrap()
    .code
}

#[tokio::test]
async fn the_first_start_enrolls_from_a_code_file_and_never_needs_it_again() {
    let broker = TestBroker::start("").await;
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("state"));
    let code_file = dir.path().join("enrollment-code");
    // As a mounted Secret: the code with a trailing newline.
    std::fs::write(&code_file, format!("{}\n", broker.token("site-k8s").await)).unwrap();
    let first = FirstStart {
        broker: Some(broker.addr().to_string()),
        code_file: Some(code_file.clone()),
        ..FirstStart::default()
    };
    let enrolled = enroll_on_first_start(&state, &first)
        .await
        .unwrap()
        .expect("enrolled");
    assert_eq!(enrolled.response.site.to_string(), "site-k8s");
    assert!(state.is_enrolled());
    let identity = state.credentials().unwrap().identity;

    // Restarts (the pod moving to another node with its volume): the code
    // is used by now, and the site keeps its identity without it.
    assert!(
        enroll_on_first_start(&state, &first)
            .await
            .unwrap()
            .is_none()
    );
    std::fs::remove_file(&code_file).unwrap();
    assert!(
        enroll_on_first_start(&state, &first)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(state.credentials().unwrap().identity, identity);
}

#[tokio::test]
async fn a_used_or_expired_code_is_refused_in_plain_words() {
    let broker = TestBroker::start("").await;
    let dir = tempfile::tempdir().unwrap();

    // Used: another site directory enrolled with it first.
    let code = broker.token("site-used").await;
    let elsewhere = StateDir::new(dir.path().join("elsewhere"));
    tether::enroll::enroll(&broker.addr().to_string(), &code, &elsewhere, false, None)
        .await
        .unwrap();
    let state = StateDir::new(dir.path().join("state"));
    let first = FirstStart {
        broker: Some(broker.addr().to_string()),
        code: Some(code),
        ..FirstStart::default()
    };
    let err = enroll_on_first_start(&state, &first).await.unwrap_err();
    let refused = err
        .downcast_ref::<EnrollmentRefused>()
        .unwrap_or_else(|| panic!("not a refusal: {err:#}"));
    assert_eq!(
        refused.to_string(),
        "the broker refused enrollment: the enrollment token is unknown or was already used; ask the operator for a new one"
    );
    assert!(!state.is_enrolled());

    // Expired: a token valid for a millisecond, used once that has passed.
    let created = std::time::SystemTime::now();
    let code = token_with_ttl(&broker, "site-late", "1ms").await;
    while created.elapsed().unwrap() < std::time::Duration::from_millis(2) {
        tokio::task::yield_now().await;
    }
    let first = FirstStart {
        code: Some(code),
        ..first
    };
    let err = enroll_on_first_start(&state, &first).await.unwrap_err();
    let text = err
        .downcast_ref::<EnrollmentRefused>()
        .unwrap_or_else(|| panic!("not a refusal: {err:#}"))
        .to_string();
    assert!(
        text.starts_with("the broker refused enrollment: the enrollment token expired"),
        "{text}"
    );
    assert!(text.ends_with("ask the operator for a new one"), "{text}");
    assert!(!state.is_enrolled());

    // Replaced: the operator created a newer code for the same site.
    let old = broker.token("site-again").await;
    let new = broker.token("site-again").await;
    let first = FirstStart {
        code: Some(old),
        ..first
    };
    let err = enroll_on_first_start(&state, &first).await.unwrap_err();
    let text = err
        .downcast_ref::<EnrollmentRefused>()
        .unwrap_or_else(|| panic!("not a refusal: {err:#}"))
        .to_string();
    assert!(
        text.contains("this code was replaced by a newer one for the same site"),
        "{text}"
    );
    assert!(!state.is_enrolled());
    // The newest code enrolls.
    let first = FirstStart {
        code: Some(new),
        ..first
    };
    enroll_on_first_start(&state, &first).await.unwrap();
    assert!(state.is_enrolled());
}

#[tokio::test]
async fn without_a_code_or_a_broker_the_first_start_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("state"));
    // No code (an optional Secret not mounted): nothing to do here; `tether
    // up` then reports that the site is not enrolled.
    let none = FirstStart {
        broker: Some("127.0.0.1:1".into()),
        code_file: Some(dir.path().join("absent")),
        ..FirstStart::default()
    };
    assert!(
        enroll_on_first_start(&state, &none)
            .await
            .unwrap()
            .is_none()
    );
    let no_broker = FirstStart {
        code: Some("tt1-abc-def".into()),
        ..FirstStart::default()
    };
    let text = format!(
        "{:#}",
        enroll_on_first_start(&state, &no_broker).await.unwrap_err()
    );
    assert!(text.contains("set TETHER_BROKER"), "{text}");
}

/// A CSR followed by bytes of something else is refused before the token
/// is looked at: the code is not spent, and the site enrolls with it
/// once it sends its CSR alone.
#[tokio::test]
async fn a_csr_with_trailing_bytes_is_refused_and_leaves_the_code_valid() {
    let broker = TestBroker::start("").await;
    let code = broker.token("site-junk").await;
    let (_, csr) = tether_pki::ca::site_key_and_csr("site-junk").unwrap();
    let mut junk = csr.clone();
    junk.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]);
    let body = |csr: &[u8]| {
        serde_json::to_vec(&tether_proto::api::EnrollRequest {
            token: code.clone(),
            csr: data_encoding::BASE64.encode(csr),
        })
        .unwrap()
    };
    let refused = tether_broker::enroll::enroll(broker.broker(), &body(&junk)).await;
    let text = String::from_utf8_lossy(&refused.body).into_owned();
    assert_eq!(refused.status, 400, "{text}");
    assert!(text.contains("8 bytes follow"), "{text}");
    let enrolled = tether_broker::enroll::enroll(broker.broker(), &body(&csr)).await;
    assert_eq!(
        enrolled.status,
        200,
        "{}",
        String::from_utf8_lossy(&enrolled.body)
    );
    // Spent now.
    let again = tether_broker::enroll::enroll(broker.broker(), &body(&csr)).await;
    assert_eq!(again.status, 401);
}
