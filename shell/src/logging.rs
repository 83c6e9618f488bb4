//! Log output of the binaries.

/// Logs to standard error, at the level `RUST_LOG` names (`info` when it is
/// unset or unreadable).
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
