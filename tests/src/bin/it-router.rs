//! The router as a separate process, for tests that kill it: `it-router POLICY CONFIG`.
//! Same entry point as `concord router`.

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let policy = args.next().context("usage: it-router POLICY CONFIG")?;
    let config = args.next().context("usage: it-router POLICY CONFIG")?;
    let text = std::fs::read_to_string(&config).with_context(|| format!("read {config}"))?;
    let cfg = concord_router::RouterConfig::from_toml(&text, &config)?;
    concord_router::run_blocking(cfg, policy.into())
}
