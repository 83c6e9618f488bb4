//! Enrollment with a broker name the broker's certificate does not carry
//! says so, and which names it does carry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
