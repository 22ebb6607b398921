//! The log output every cmm program shares (`cmm-scout`, `cmm-proxy`, `cmm-relay`).

/// Logs to stderr at `RUST_LOG`'s levels (`info` when unset), in colour only on a terminal.
pub fn init() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
