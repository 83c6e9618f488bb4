//! The deterministic simulation of brokers and sites (`tether_tests::sim`):
//! a thousand seeded cases of up to 50 steps, every invariant checked after
//! every step. `SIM_SEED=<n>` replays one case and prints its steps;
//! `SIM_CASES=<n>` runs more or fewer.

use tether_tests::sim::{Sim, Stats, run_case};

const STEPS: usize = 50;

#[test]
fn random_schedules_keep_every_invariant() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        match run_case(seed, STEPS) {
            Ok(stats) => println!("seed {seed}: {stats:?}"),
            Err(v) => panic!("{v}"),
        }
        return;
    }
    let cases: u64 = std::env::var("SIM_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut total = Stats::default();
    for seed in 0..cases {
        match run_case(seed, STEPS) {
            Ok(stats) => total += stats,
            Err(v) => panic!("{v}"),
        }
    }
    println!("{cases} cases: {total:?}");
    if cases >= 1000 {
        // The schedule reaches the interleavings the invariants are about.
        assert!(total.replaced > 0, "{total:?}");
        assert!(total.superseded > 0, "{total:?}");
        assert!(total.refused_revoked > 0, "{total:?}");
        assert!(total.conflicts > 0, "{total:?}");
        assert!(total.swept > 0, "{total:?}");
        assert!(total.expired > 0, "{total:?}");
        assert!(total.restarts > 0, "{total:?}");
    }
}

#[test]
fn a_case_is_a_function_of_its_seed() {
    let a = format!("{:?}", Sim::new(7).run(STEPS).map_err(|v| v.to_string()));
    let b = format!("{:?}", Sim::new(7).run(STEPS).map_err(|v| v.to_string()));
    assert_eq!(a, b);
}
