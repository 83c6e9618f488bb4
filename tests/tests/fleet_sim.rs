//! The deterministic simulation of site ownership in a broker fleet
//! (`tether_tests::fleet_sim`): seeded cases of random kills, cuts from
//! etcd, clock steps and site moves, the fencing invariants checked after
//! every step. `SIM_SEED=<n>` replays one case and prints its steps;
//! `FLEET_SIM_CASES=<n>` runs more or fewer.

#![allow(clippy::expect_used)]

use tether_tests::fleet_sim::{FleetStats, Rules, run_case};

const STEPS: usize = 80;

fn cases() -> u64 {
    std::env::var("FLEET_SIM_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

#[test]
fn random_schedules_keep_one_owner_per_site() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        match run_case(seed, STEPS, Rules::default()) {
            Ok(stats) => println!("seed {seed}: {stats:?}"),
            Err(v) => panic!("{v}"),
        }
        return;
    }
    let cases = cases();
    let mut total = FleetStats::default();
    for seed in 0..cases {
        match run_case(seed, STEPS, Rules::default()) {
            Ok(stats) => total += stats,
            Err(v) => panic!("{v}"),
        }
    }
    println!("{cases} cases: {total:?}");
    if cases >= 2000 {
        // The schedule reaches what the invariants are about.
        assert!(total.fenced > 0, "{total:?}");
        assert!(total.moved > 0, "{total:?}");
        assert!(total.ended > 0, "{total:?}");
        assert!(total.refused > 0, "{total:?}");
        assert!(total.expired_keys > 0, "{total:?}");
        assert!(total.kills > 0, "{total:?}");
    }
}

/// The first seed under `rules` that breaks an invariant, with its report.
fn first_violation(rules: Rules) -> Option<String> {
    (0..cases()).find_map(|seed| run_case(seed, STEPS, rules).err().map(|v| v.to_string()))
}

#[test]
fn counting_a_renewal_from_its_answer_is_caught() {
    let report = first_violation(Rules {
        renewal_from_answer: true,
        ..Rules::default()
    })
    .expect("a renewal counted from its answer breaks fencing in some case");
    println!("{report}");
    assert!(report.contains("etcd has expired its lease"), "{report}");
}

#[test]
fn writing_a_claim_without_the_lease_is_caught() {
    let report = first_violation(Rules {
        claim_without_lease: true,
        ..Rules::default()
    })
    .expect("a claim written without the lease replaces a newer owner in some case");
    println!("{report}");
    assert!(report.contains("could not prove its lease"), "{report}");
}
