//! The router as a separate process, for tests that kill it: `it-router POLICY CONFIG`.
//! Same entry point as `concord router`; logs (`RUST_LOG`, default warn) go to stderr.

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    // Warnings and errors (RUST_LOG) on stderr, as `concord router` logs them.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let policy = args.next().context("usage: it-router POLICY CONFIG")?;
    let config = args.next().context("usage: it-router POLICY CONFIG")?;
    let text = std::fs::read_to_string(&config).with_context(|| format!("read {config}"))?;
    let cfg = concord_router::RouterConfig::from_toml(&text, &config)?;
    concord_router::run_blocking(cfg, policy.into())
}
