//! CPU time per byte moved: the whole machine's busy time from
//! `/proc/stat` and single processes' from `/proc/PID/stat`, sampled around
//! one iperf3 run and divided by the bytes the run moved.
//!
//! The whole-machine figure counts everything the machine did during the
//! run: both tunnel ends, both iperf3 ends, the kernel's forwarding in every
//! namespace, and anything else running on it at the time.

use std::sync::OnceLock;

/// Clock ticks per second of `/proc/stat` and `/proc/PID/stat`.
fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t: &f64| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The machine's busy ticks so far, over all CPUs: user, nice, system,
/// irq, softirq and steal (guest time is already inside user and nice).
fn machine_busy() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum()
}

/// User plus system ticks of process `pid` (all its threads) so far; 0 if
/// it is gone.
fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces and parentheses: fields count from
    // after its closing one. utime and stime are fields 14 and 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

/// CPU time used so far by the machine and by some processes.
pub(crate) struct Sample {
    machine: u64,
    procs: Vec<u64>,
}

/// Samples the machine and the processes `pids`.
pub(crate) fn sample(pids: &[u32]) -> Sample {
    Sample {
        machine: machine_busy(),
        procs: pids.iter().map(|&p| process_ticks(p)).collect(),
    }
}

/// CPU seconds per GB (10^9 bytes) moved between two samples.
#[derive(Clone, Default)]
pub(crate) struct PerGb {
    /// The whole machine.
    pub(crate) machine: f64,
    /// Each process sampled, in the order given to [`sample`].
    pub(crate) procs: Vec<f64>,
}

/// CPU seconds per GB for `bytes` moved from `before` to `after`.
pub(crate) fn per_gb(before: &Sample, after: &Sample, bytes: u64) -> PerGb {
    let gb = bytes as f64 / 1e9;
    let secs = |a: u64, b: u64| a.saturating_sub(b) as f64 / ticks_per_second();
    let of = |t: f64| if gb > 0.0 { t / gb } else { f64::NAN };
    PerGb {
        machine: of(secs(after.machine, before.machine)),
        procs: after
            .procs
            .iter()
            .zip(&before.procs)
            .map(|(&a, &b)| of(secs(a, b)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_gb_divides_busy_time_by_bytes() {
        let t = ticks_per_second();
        let before = Sample {
            machine: 1000,
            procs: vec![10, 20],
        };
        let after = Sample {
            machine: 1000 + (3.0 * t) as u64,
            procs: vec![10 + t as u64, 20],
        };
        let r = per_gb(&before, &after, 2_000_000_000);
        assert!((r.machine - 1.5).abs() < 1e-9);
        assert!((r.procs[0] - 0.5).abs() < 1e-9);
        assert_eq!(r.procs[1], 0.0);
        assert!(per_gb(&before, &after, 0).machine.is_nan());
    }

    #[test]
    fn reads_this_process_and_the_machine() {
        let me = std::process::id();
        let start = sample(&[me]);
        // Burn some CPU so both counters move.
        let mut x = 0u64;
        let until = std::time::Instant::now() + std::time::Duration::from_millis(200);
        while std::time::Instant::now() < until {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let end = sample(&[me]);
        assert!(end.machine > start.machine);
        assert!(end.procs[0] > start.procs[0]);
    }
}
