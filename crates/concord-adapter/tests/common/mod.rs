//! What the runner tests over in-memory transports share.
#![allow(clippy::unwrap_used, dead_code)]

use concord_adapter::{RetryConfig, RunnerConfig};

/// Settings of the seed's `orders` system with its state in `state`, reconnecting at once (the
/// transports are in memory; no broker at `amqp_uri`).
pub fn orders_config(state: &std::path::Path) -> RunnerConfig {
    let policy = concord_seed_model::write_seed(state).unwrap();
    let mut c = RunnerConfig::new(
        "orders",
        "amqp://unused",
        state.join("orders.sqlite"),
        policy,
    );
    c.reconnect = RetryConfig {
        min_delay_ms: 1,
        max_delay_ms: 10,
    };
    c
}
