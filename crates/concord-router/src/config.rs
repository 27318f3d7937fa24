//! The router's configuration: read from TOML, validated once at start.

use std::fmt;
use std::net::SocketAddr;

use concord_policy::RouterSettings;
use serde::Deserialize;

/// Default AMQP URI (the local broker's default vhost).
pub const DEFAULT_AMQP_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Largest message body RabbitMQ accepts by default (128 MiB); a larger limit is a mistake.
const MAX_MESSAGE_BYTES_CEILING: usize = 128 * 1024 * 1024;

/// The kind of queue the router declares for its input and for the inboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// Classic durable queues (the default; fine for a single broker).
    #[default]
    Classic,
    /// Quorum (replicated) queues; required for `delivery_limit`.
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// Most runtime worker threads `worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 64;

/// The configuration of one router process.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Broker to connect to (`amqp://` or `amqps://`); the nodes of a cluster as several URIs
    /// separated by commas, tried in turn on every (re)connection.
    pub amqp_uri: String,
    /// Prefix of every exchange and queue name, so that several deployments share a broker.
    pub namespace: String,
    /// Unacknowledged input messages the broker may push to the router at once, over both lanes:
    /// the resync lane takes [`RouterConfig::resync_lane_prefetch`] of them, the live input the
    /// rest.
    pub prefetch: u16,
    /// Prefetch of the resync lane (`{ns}.router.resync`, backfills), taken from `prefetch` and
    /// at most half of it: the live input keeps the rest, and is always served first.
    pub resync_prefetch: u16,
    /// The broker user of the operator: the only one whose control requests (`{ns}.control`,
    /// e.g. `concord resync`) the router acts on.
    pub operator_user: String,
    /// Routed messages that may await their publisher confirm at once.
    pub confirm_window: usize,
    /// Input acknowledgements sent at once (as one `multiple` ack).
    pub ack_batch: usize,
    /// Address of the HTTP endpoints (`/healthz`, `/readyz`, `/metrics`); port 0 picks a free port.
    pub http_listen: String,
    /// How far a field clock may be ahead of the router's clock, in milliseconds.
    pub clock_skew_ms: u64,
    /// Largest accepted input message, in bytes.
    pub max_message_bytes: usize,
    /// Refuse input messages without a broker-validated `user_id` property (the default: the
    /// source of a change is the broker user that published it). Turn off only on a broker
    /// where every publisher is trusted.
    pub require_user_id: bool,
    /// Broker user → the system it publishes as, when broker user names differ from system names
    /// (a user not listed publishes as the system of its own name).
    pub users: std::collections::BTreeMap<String, String>,
    /// TLS for `amqps://` URIs: the broker's CA and a client certificate (`[tls]`).
    pub tls: Option<concord_amqp::TlsFiles>,
    /// Memory the router may use for the messages it holds, in MiB. It holds up to `prefetch`
    /// inputs of up to `max_message_bytes` each, as much again while it decodes and projects
    /// them, and up to `confirm_window` copies being published:
    /// `(2 × prefetch + confirm_window) × max_message_bytes` must fit, so that no input can make
    /// it run out of memory. Size the container's memory limit at the budget plus the router's
    /// own footprint (about 30 MiB; allow 48).
    pub memory_budget_mib: u64,
    /// Kind of the queues the router declares.
    pub queue_type: QueueType,
    /// With quorum queues: redeliveries after which the broker dead-letters an input message.
    pub delivery_limit: Option<u32>,
    /// Reload the policy when its file changes (it is always reloaded on SIGHUP).
    pub watch_policy: bool,
    /// Number of router input queues. `1` (the default) is the single `{ns}.router` queue; more
    /// partitions the input by record key (consistent-hash exchange `{ns}.partition` into
    /// `{ns}.router.p0` … with a single active consumer each), so that several replicas share
    /// the work without breaking per-record order. Every replica and every deployment of the
    /// namespace must use the same value; change it only with the input drained.
    pub partitions: u16,
    /// Number of router replicas sharing the partitions (e.g. a StatefulSet's replica count);
    /// set together with `replica_index`. Needs `partitions` > 1.
    pub replicas: Option<u16>,
    /// This replica's index, `0..replicas` (e.g. a StatefulSet ordinal). The replica takes its
    /// preferred partitions (`i % replicas == replica_index`) at once and subscribes to the others
    /// as a standby after `standby_delay_ms`.
    pub replica_index: Option<u16>,
    /// How long a replica waits before subscribing to the partitions it does not prefer, so
    /// that replicas starting together each become the active consumer of their own share.
    pub standby_delay_ms: u64,
    /// Threads of the async runtime `concord router` runs on. The pipeline is one task and the
    /// AMQP client does its socket I/O on its own thread, so one worker (the default) is enough
    /// for what one broker can take; more threads only add wake-ups and contend with the broker
    /// for cores on a small machine. Scale out with `partitions` and replicas instead.
    pub worker_threads: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            amqp_uri: DEFAULT_AMQP_URI.to_owned(),
            namespace: "concord".to_owned(),
            prefetch: 256,
            resync_prefetch: 16,
            operator_user: "operator".to_owned(),
            confirm_window: 512,
            ack_batch: 32,
            http_listen: "127.0.0.1:9464".to_owned(),
            clock_skew_ms: 60_000,
            max_message_bytes: 1024 * 1024,
            require_user_id: true,
            users: std::collections::BTreeMap::new(),
            tls: None,
            memory_budget_mib: 1024,
            queue_type: QueueType::Classic,
            delivery_limit: None,
            watch_policy: true,
            partitions: 1,
            replicas: None,
            replica_index: None,
            standby_delay_ms: 2_000,
            worker_threads: 1,
        }
    }
}

/// A configuration that could not be read or is not valid; lists every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file (or other source) the configuration came from.
    pub file: String,
    /// One message per problem, naming the setting.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {p}", self.file)?;
        }
        Ok(())
    }
}

impl RouterConfig {
    /// The exchanges and queues this router declares (namespace, queue type, delivery limit,
    /// partitions): also what `concord broker-defs` writes.
    pub fn topology(&self) -> concord_amqp::Topology {
        let mut topology = concord_amqp::Topology::new(self.namespace.clone()).with_queue_type(
            match self.queue_type {
                QueueType::Classic => concord_amqp::QueueType::Classic,
                QueueType::Quorum => concord_amqp::QueueType::Quorum,
            },
        );
        if let Some(limit) = self.delivery_limit {
            topology = topology.with_delivery_limit(limit);
        }
        topology.with_partitions(self.partitions)
    }

    /// Parses and validates a configuration; `file` names the source in error messages.
    pub fn from_toml(text: &str, file: &str) -> Result<RouterConfig, ConfigError> {
        let config: RouterConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_owned(),
            problems: vec![e.to_string().trim_end().replace('\n', " ")],
        })?;
        config.validate(file)?;
        Ok(config)
    }

    /// Checks every setting; `file` names the source in error messages.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if !(self.amqp_uri.starts_with("amqp://") || self.amqp_uri.starts_with("amqps://")) {
            problems.push("`amqp_uri` must start with `amqp://` or `amqps://`".to_owned());
        }
        if self.namespace.is_empty()
            || !self.namespace.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
            })
        {
            problems.push(format!(
                "`namespace` {:?} must match [a-z0-9_.-]+ (it prefixes exchange and queue names)",
                self.namespace
            ));
        } else if self.namespace.len() > 100 {
            problems.push(
                "`namespace` must be at most 100 bytes (queue names are limited to 255)".to_owned(),
            );
        }
        if self.prefetch < 2 {
            problems.push(
                "`prefetch` must be at least 2 (the resync lane takes a share of it)".to_owned(),
            );
        }
        if self.resync_prefetch == 0 {
            problems.push("`resync_prefetch` must be at least 1".to_owned());
        }
        if self.operator_user.is_empty() {
            problems.push("`operator_user` must not be empty".to_owned());
        }
        let held = (2 * u64::from(self.prefetch) + self.confirm_window as u64)
            .saturating_mul(self.max_message_bytes as u64);
        if held > self.memory_budget_mib.saturating_mul(1 << 20) {
            problems.push(format!(
                "(2 × `prefetch` ({}) + `confirm_window` ({})) × `max_message_bytes` ({}) = {} MiB exceeds `memory_budget_mib` ({}): lower one of them, or raise the budget",
                self.prefetch,
                self.confirm_window,
                self.max_message_bytes,
                held >> 20,
                self.memory_budget_mib
            ));
        }
        if let Some(tls) = &self.tls
            && let Err(e) = tls.load()
        {
            problems.push(format!("`tls`: {e}"));
        }
        if self.confirm_window == 0 {
            problems.push("`confirm_window` must be at least 1".to_owned());
        }
        if self.ack_batch == 0 {
            problems.push("`ack_batch` must be at least 1".to_owned());
        } else if self.prefetch > 0 && self.ack_batch > usize::from(self.prefetch) {
            problems.push(format!(
                "`ack_batch` ({}) must not exceed `prefetch` ({}): a batch could never fill",
                self.ack_batch, self.prefetch
            ));
        }
        if let Err(e) = self.http_listen.parse::<SocketAddr>() {
            problems.push(format!(
                "`http_listen` {:?} is not an address like `127.0.0.1:9464`: {e}",
                self.http_listen
            ));
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > MAX_MESSAGE_BYTES_CEILING {
            problems.push(format!(
                "`max_message_bytes` must be between 1 and {MAX_MESSAGE_BYTES_CEILING}, is {}",
                self.max_message_bytes
            ));
        }
        match (self.queue_type, self.delivery_limit) {
            (QueueType::Classic, Some(_)) => problems.push(
                "`delivery_limit` needs `queue_type = \"quorum\"` (classic queues do not count redeliveries)"
                    .to_owned(),
            ),
            (QueueType::Quorum, Some(0)) => {
                problems.push("`delivery_limit` must be at least 1".to_owned());
            }
            _ => {}
        }
        if self.worker_threads == 0 || self.worker_threads > MAX_WORKER_THREADS {
            problems.push(format!(
                "`worker_threads` must be between 1 and {MAX_WORKER_THREADS}, is {}",
                self.worker_threads
            ));
        }
        self.validate_partitions(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                file: file.to_owned(),
                problems,
            })
        }
    }

    fn validate_partitions(&self, problems: &mut Vec<String>) {
        let max = concord_amqp::topology::MAX_PARTITIONS;
        if self.partitions == 0 || self.partitions > max {
            problems.push(format!(
                "`partitions` must be between 1 and {max}, is {}",
                self.partitions
            ));
        }
        match (self.replicas, self.replica_index) {
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => problems
                .push("`replicas` and `replica_index` go together: set both or neither".to_owned()),
            (Some(0), Some(_)) => problems.push("`replicas` must be at least 1".to_owned()),
            (Some(replicas), Some(index)) => {
                if index >= replicas {
                    problems.push(format!(
                        "`replica_index` ({index}) must be less than `replicas` ({replicas})"
                    ));
                }
                if replicas > 1 && self.partitions <= 1 {
                    problems.push(format!(
                        "`replicas` = {replicas} needs `partitions` > 1: replicas sharing the single \
                         router queue would break per-record order"
                    ));
                }
            }
        }
    }

    /// The partitions this replica subscribes to at once, in partition order: those with
    /// `i % replicas == replica_index`, or every partition without replica settings.
    pub fn preferred_partitions(&self) -> Vec<u16> {
        let all = 0..self.partitions.max(1);
        match (self.replicas, self.replica_index) {
            (Some(replicas), Some(index)) if replicas > 0 => {
                all.filter(|i| i % replicas == index).collect()
            }
            _ => all.collect(),
        }
    }

    /// Prefetch of the resync lane: `resync_prefetch`, at most half of `prefetch`.
    pub fn resync_lane_prefetch(&self) -> u16 {
        self.resync_prefetch.clamp(1, (self.prefetch / 2).max(1))
    }

    /// Prefetch of the live input (of each partition queue): `prefetch` less the resync lane's.
    pub fn live_lane_prefetch(&self) -> u16 {
        self.prefetch
            .saturating_sub(self.resync_lane_prefetch())
            .max(1)
    }

    /// The limits the pure routing core enforces.
    pub fn settings(&self) -> RouterSettings {
        RouterSettings {
            max_message_bytes: self.max_message_bytes,
            clock_skew_ms: self.clock_skew_ms,
            require_user_id: self.require_user_id,
            users: self.users.clone(),
            check_key_header: self.partitions > 1,
        }
    }

    /// The HTTP listen address (valid after [`RouterConfig::validate`]).
    pub fn http_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.http_listen.parse().map_err(|e| ConfigError {
            file: "config".to_owned(),
            problems: vec![format!("`http_listen` {:?}: {e}", self.http_listen)],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_router_may_hold_must_fit_its_memory_budget() {
        let e = RouterConfig::from_toml("memory_budget_mib = 512\n", "router.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("memory_budget_mib") && e.contains("1024 MiB"),
            "{e}"
        );
        let c = RouterConfig::from_toml(
            "memory_budget_mib = 64\nprefetch = 16\nconfirm_window = 32\nack_batch = 8\n",
            "router.toml",
        )
        .unwrap();
        c.validate("router.toml").unwrap();
        RouterConfig::default().validate("defaults").unwrap();
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = RouterConfig::from_toml("", "router.toml").unwrap();
        assert_eq!(c, RouterConfig::default());
        assert_eq!(c.prefetch, 256);
        assert_eq!(c.confirm_window, 512);
        assert_eq!(c.ack_batch, 32);
        assert_eq!(c.max_message_bytes, 1 << 20);
        assert!(c.watch_policy);
    }

    #[test]
    fn reads_every_setting() {
        let c = RouterConfig::from_toml(
            r#"
            amqp_uri = "amqps://u:p@broker:5671/v"
            namespace = "prod"
            prefetch = 64
            confirm_window = 100
            ack_batch = 8
            http_listen = "0.0.0.0:0"
            clock_skew_ms = 5000
            max_message_bytes = 4096
            require_user_id = true
            queue_type = "quorum"
            delivery_limit = 5
            watch_policy = false
            partitions = 6
            replicas = 3
            replica_index = 2
            standby_delay_ms = 500
            worker_threads = 4
            "#,
            "router.toml",
        )
        .unwrap();
        assert_eq!(c.namespace, "prod");
        assert_eq!(c.queue_type, QueueType::Quorum);
        assert_eq!(c.delivery_limit, Some(5));
        assert_eq!(c.settings().max_message_bytes, 4096);
        assert!(c.settings().require_user_id);
        assert_eq!(c.partitions, 6);
        assert_eq!((c.replicas, c.replica_index), (Some(3), Some(2)));
        assert_eq!(c.standby_delay_ms, 500);
        assert_eq!(c.worker_threads, 4);
        assert_eq!(c.preferred_partitions(), vec![2, 5]);
    }

    #[test]
    fn partitions_and_replicas() {
        let c = RouterConfig::default();
        assert_eq!(c.partitions, 1);
        assert_eq!(c.standby_delay_ms, 2_000);
        assert_eq!(c.preferred_partitions(), vec![0]);
        let c = RouterConfig::from_toml("partitions = 4\n", "r.toml").unwrap();
        assert_eq!(c.preferred_partitions(), vec![0, 1, 2, 3]);
        let c = RouterConfig::from_toml(
            "partitions = 7\nreplicas = 3\nreplica_index = 0\n",
            "r.toml",
        )
        .unwrap();
        assert_eq!(c.preferred_partitions(), vec![0, 3, 6]);
        // One replica with replica settings takes everything.
        let c = RouterConfig::from_toml("replicas = 1\nreplica_index = 0\n", "r.toml").unwrap();
        assert_eq!(c.preferred_partitions(), vec![0]);
        // More replicas than partitions: some replicas are standbys only.
        let c = RouterConfig::from_toml(
            "partitions = 2\nreplicas = 3\nreplica_index = 2\n",
            "r.toml",
        )
        .unwrap();
        assert!(c.preferred_partitions().is_empty());

        for (text, needle) in [
            ("partitions = 0\n", "`partitions` must be between"),
            ("partitions = 5000\n", "`partitions` must be between"),
            ("partitions = 4\nreplicas = 2\n", "go together"),
            ("partitions = 4\nreplica_index = 1\n", "go together"),
            (
                "partitions = 4\nreplicas = 0\nreplica_index = 0\n",
                "`replicas` must be at least 1",
            ),
            (
                "partitions = 4\nreplicas = 2\nreplica_index = 2\n",
                "must be less than",
            ),
            (
                "replicas = 2\nreplica_index = 0\n",
                "needs `partitions` > 1",
            ),
        ] {
            let e = RouterConfig::from_toml(text, "r.toml").unwrap_err();
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused_with_the_file_name() {
        let e = RouterConfig::from_toml("prefetchh = 3\n", "router.toml").unwrap_err();
        assert!(e.to_string().starts_with("router.toml: "), "{e}");
        assert!(e.to_string().contains("prefetchh"), "{e}");
        let e = RouterConfig::from_toml("queue_type = \"stream\"\n", "router.toml").unwrap_err();
        assert!(e.to_string().contains("stream"), "{e}");
    }

    #[test]
    fn lists_every_invalid_setting() {
        let e = RouterConfig::from_toml(
            r#"
            amqp_uri = "http://x"
            namespace = "Prod!"
            prefetch = 0
            confirm_window = 0
            ack_batch = 0
            http_listen = "localhost"
            max_message_bytes = 0
            delivery_limit = 3
            worker_threads = 0
            "#,
            "router.toml",
        )
        .unwrap_err();
        let text = e.to_string();
        for needle in [
            "`amqp_uri`",
            "`namespace`",
            "`prefetch`",
            "`confirm_window`",
            "`ack_batch`",
            "`http_listen`",
            "`max_message_bytes`",
            "`delivery_limit` needs",
            "`worker_threads` must be between 1 and 64, is 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(
            text.lines().all(|l| l.starts_with("router.toml: ")),
            "{text}"
        );
        assert_eq!(text.lines().count(), e.problems.len());
    }
}
