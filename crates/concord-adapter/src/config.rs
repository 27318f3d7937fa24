//! The runner's configuration.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Configuration of one adapter process (one system).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerConfig {
    /// This system's name, as in the policy (`[a-z0-9_-]+`).
    pub system: String,
    /// The broker, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`; the nodes of a cluster as
    /// several URIs separated by commas (same user and vhost), tried in turn on every
    /// (re)connection.
    pub amqp_uri: String,
    /// Prefix of every exchange and queue name.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Path of the local SQLite state store (created when missing).
    pub state: PathBuf,
    /// The deployment's policy file (the router's). The runner loads it at start with the
    /// schema its `[schema]` table names: the policy's entities, and their protobuf messages,
    /// are the entities this system exchanges.
    pub policy: PathBuf,
    /// Most unacknowledged incoming messages the broker hands out at once.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// How often, in seconds, an idle session checks its inbox consumer: when two checks in a
    /// row find messages ready in the inbox and none was delivered between them, the consumer
    /// has stalled (seen once after a broker node failure) and the session is reopened.
    #[serde(default = "default_inbox_check_secs")]
    pub inbox_check_secs: u64,
    /// Set the AMQP `user_id` property of published events to the broker user of `amqp_uri`
    /// (the broker checks it against the connection's user, and the router takes it as the
    /// source). On by default: a router with `require_user_id` refuses events without it.
    #[serde(default = "default_true")]
    pub publish_user_id: bool,
    /// The broker user the router publishes as: only messages it published (`user_id`) are
    /// applied; anything else in the inbox is dead-lettered (`untrusted_publisher`).
    #[serde(default = "default_router_user")]
    pub router_user: String,
    /// Most local changes published in one batch (one confirm round trip, one transaction).
    #[serde(default = "default_publish_batch")]
    pub publish_batch: usize,
    /// Publish a snapshot of every record (`OP_SNAPSHOT`) the first time the state store is used.
    #[serde(default)]
    pub snapshot_on_first_start: bool,
    /// How long ids of processed incoming events are kept for deduplication, in hours.
    #[serde(default = "default_dedup_retention_hours")]
    pub dedup_retention_hours: u64,
    /// Most ids of processed incoming events kept for deduplication (the oldest go first).
    #[serde(default = "default_dedup_max_entries")]
    pub dedup_max_entries: u64,
    /// How long the SDK waits for the change feed to report a value it applied, in seconds.
    /// Until then, a local change equal to that value is taken for its echo, even after newer
    /// values were applied (feeds lag). The feed must report the SDK's own writes.
    #[serde(default = "default_echo_window_secs")]
    pub echo_window_secs: u64,
    /// The router's `clock_skew_ms`: clocks further ahead of this system's wall clock than
    /// twice this could not have come through the router and are never adopted (a clock found
    /// that far ahead is reset to the wall clock).
    #[serde(default = "default_clock_skew_ms")]
    pub clock_skew_ms: u64,
    /// Largest incoming message processed, in bytes (the router's `max_message_bytes`); a larger
    /// one is dead-lettered (`too_large`) without being decoded.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Backoff for transient failures (apply, change feed, publishing).
    #[serde(default)]
    pub retry: RetryConfig,
    /// Backoff between reconnection attempts to the broker.
    #[serde(default)]
    pub reconnect: RetryConfig,
    /// TLS for `amqps://` URIs: the broker's CA and a client certificate (`[tls]`).
    #[serde(default)]
    pub tls: Option<concord_amqp::TlsFiles>,
}

/// Exponential backoff settings. Retries never stop: a failure that lasts is retried at
/// `max_delay_ms` intervals, so no change is ever dropped because a system was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "default_min_delay_ms")]
    pub min_delay_ms: u64,
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            min_delay_ms: default_min_delay_ms(),
            max_delay_ms: default_max_delay_ms(),
        }
    }
}

impl RetryConfig {
    /// An endless iterator of delays: doubling from `min_delay_ms` up to `max_delay_ms`, jittered.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        use backon::BackoffBuilder;
        let min = Duration::from_millis(self.min_delay_ms.max(1));
        let max = Duration::from_millis(self.max_delay_ms.max(self.min_delay_ms).max(1));
        backon::ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times()
            .build()
            .map(move |d| d.min(max))
    }
}

fn default_namespace() -> String {
    "concord".to_owned()
}
/// The SDK's `prefetch` (an adapter may have its own: [`crate::Adapter::PREFETCH`]).
pub const DEFAULT_PREFETCH: u16 = 64;

fn default_prefetch() -> u16 {
    DEFAULT_PREFETCH
}
fn default_publish_batch() -> usize {
    256
}
fn default_dedup_max_entries() -> u64 {
    1_000_000
}
fn default_dedup_retention_hours() -> u64 {
    24 * 7
}
fn default_true() -> bool {
    true
}
fn default_router_user() -> String {
    "router".to_owned()
}
fn default_max_message_bytes() -> usize {
    1024 * 1024
}
fn default_clock_skew_ms() -> u64 {
    concord_policy::replica::DEFAULT_CLOCK_SKEW_MS
}
fn default_inbox_check_secs() -> u64 {
    15
}

fn default_echo_window_secs() -> u64 {
    3600
}
fn default_min_delay_ms() -> u64 {
    100
}
fn default_max_delay_ms() -> u64 {
    30_000
}

impl RunnerConfig {
    /// A configuration with defaults for everything but the essentials.
    pub fn new(
        system: impl Into<String>,
        amqp_uri: impl Into<String>,
        state: impl Into<PathBuf>,
        policy: impl Into<PathBuf>,
    ) -> RunnerConfig {
        RunnerConfig {
            system: system.into(),
            amqp_uri: amqp_uri.into(),
            namespace: default_namespace(),
            state: state.into(),
            policy: policy.into(),
            prefetch: default_prefetch(),
            publish_user_id: true,
            router_user: default_router_user(),
            publish_batch: default_publish_batch(),
            snapshot_on_first_start: false,
            dedup_retention_hours: default_dedup_retention_hours(),
            dedup_max_entries: default_dedup_max_entries(),
            echo_window_secs: default_echo_window_secs(),
            inbox_check_secs: default_inbox_check_secs(),
            clock_skew_ms: default_clock_skew_ms(),
            max_message_bytes: default_max_message_bytes(),
            retry: RetryConfig::default(),
            reconnect: RetryConfig::default(),
            tls: None,
        }
    }

    /// Checks what serde cannot: names and limits.
    pub fn validate(&self) -> Result<(), String> {
        if !concord_policy::valid_name(&self.system) {
            return Err(format!(
                "system name {:?} must match [a-z0-9_-]+",
                self.system
            ));
        }
        if let Some(tls) = &self.tls {
            tls.load().map_err(|e| format!("tls: {e}"))?;
        }
        if let Err(e) = concord_amqp::login_of(&self.amqp_uri) {
            return Err(format!("amqp_uri is not a valid AMQP URI: {e}"));
        }
        if self.namespace.is_empty() {
            return Err("namespace must not be empty".into());
        }
        if self.policy.as_os_str().is_empty() {
            return Err("no policy file configured".into());
        }
        if self.inbox_check_secs == 0 {
            return Err("inbox_check_secs must be at least 1".into());
        }
        if self.prefetch == 0 {
            return Err("prefetch must be at least 1".into());
        }
        if self.dedup_max_entries == 0 {
            return Err("dedup_max_entries must be at least 1".into());
        }
        if self.publish_batch == 0 {
            return Err("publish_batch must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults_and_refuses_unknown_keys() {
        let text = r#"
            system = "delivery"
            amqp_uri = "amqp://guest:guest@127.0.0.1:5672/%2f"
            state = "/var/lib/concord/delivery.sqlite"
            policy = "/etc/concord/policy.toml"
            [retry]
            max_delay_ms = 5000
        "#;
        let c: RunnerConfig = toml::from_str(text).unwrap();
        assert_eq!(c.namespace, "concord");
        assert_eq!(c.prefetch, 64);
        assert!(c.publish_user_id);
        assert_eq!(c.router_user, "router");
        assert_eq!(
            c.retry,
            RetryConfig {
                min_delay_ms: 100,
                max_delay_ms: 5000
            }
        );
        assert_eq!(c.policy, PathBuf::from("/etc/concord/policy.toml"));
        c.validate().unwrap();

        let err = toml::from_str::<RunnerConfig>(&format!("{text}\nprefech = 3\n")).unwrap_err();
        assert!(err.to_string().contains("prefech"), "{err}");
        let mut bad = c.clone();
        bad.system = "Delivery".into();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn delays_grow_and_stay_capped() {
        let r = RetryConfig {
            min_delay_ms: 10,
            max_delay_ms: 80,
        };
        let d: Vec<Duration> = r.delays().take(20).collect();
        assert_eq!(d.len(), 20);
        assert!(d.iter().all(|d| *d <= Duration::from_millis(80)));
        assert!(d[19] >= Duration::from_millis(40), "{d:?}");
    }
}
