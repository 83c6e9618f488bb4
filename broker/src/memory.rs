//! The allocator's hold on freed memory.
//!
//! glibc's malloc gives a thread that finds an arena's lock taken an arena
//! of its own, up to 8 per core, and keeps what is freed in each arena for
//! reuse there. A broker's allocations come in bursts on whichever
//! runtime or blocking thread serves them (a thousand sites dialling at
//! once, each enrollment a QUIC connection of its own), so with many
//! arenas much of what one burst freed sits where the next one does not
//! look. Two arenas held about 2 KiB less per idle site at 1,000 sites
//! than glibc's default (16 on 2 cores), measured with `tether-bench
//! --idle` (BENCHMARKS.md).

/// The arenas glibc's malloc may create, unless `MALLOC_ARENA_MAX` in the
/// environment says otherwise.
pub const ARENAS: i32 = 2;

/// Limits glibc's malloc to [`ARENAS`] arenas unless `MALLOC_ARENA_MAX` is
/// set (glibc read it at start, and it stays in force). Call before any
/// thread starts. Returns whether the limit was set (never on other C
/// libraries).
pub fn limit_arenas() -> bool {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return false;
    }
    set_arena_max(ARENAS)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_arena_max(arenas: i32) -> bool {
    // SAFETY: mallopt only changes a parameter of malloc, under malloc's
    // own lock; M_ARENA_MAX takes any positive count.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_arenas: i32) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc takes the limit (mallopt answers 1 when it accepts a value),
    /// and the environment's setting wins over it.
    #[test]
    fn the_arena_limit_is_taken_unless_the_environment_sets_one() {
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            assert!(!limit_arenas());
        } else {
            assert_eq!(
                limit_arenas(),
                cfg!(all(target_os = "linux", target_env = "gnu"))
            );
        }
    }
}
