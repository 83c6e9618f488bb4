//! Concurrent enrollments on one broker read the region's leases from the
//! store only when they must: this broker's own commits keep its cache
//! current, so neither the allocations nor the notices of those commits
//! read the whole region again (a read that grows with the region, and
//! made enrollment slower the more sites there were).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tether_tests::{TestBroker, TestSite};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enrollments_do_not_reread_the_region() {
    let broker = Arc::new(TestBroker::start("").await);
    let mut sites = Vec::new();
    for round in 0..4 {
        let mut batch = tokio::task::JoinSet::new();
        for i in 0..16 {
            let broker = broker.clone();
            batch
                .spawn(async move { TestSite::enroll(&broker, &format!("lab-{round}-{i}")).await });
        }
        sites.extend(batch.join_all().await);
    }
    assert_eq!(sites.len(), 64);
    // Let the store's notices of the last commits arrive.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let reads = broker.broker().core().lease_reads();
    let (allocation, notice) = (
        reads.allocation.load(Ordering::Relaxed),
        reads.notice.load(Ordering::Relaxed),
    );
    println!("region reads for 64 enrollments: {allocation} for allocations, {notice} on notices");
    assert!(allocation <= 1, "{allocation} reads for allocations");
    assert_eq!(
        notice, 0,
        "{notice} reads on notices of this broker's own commits"
    );
}
