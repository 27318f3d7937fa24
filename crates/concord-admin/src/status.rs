//! `concord status`: per system its inbox (depth, consumers, rates) and dead letters by reason,
//! the router's input queue(s) with their consumers (with partitions: which connection is each
//! one's single active consumer), the router's dead letters and its end-to-end lag; and what
//! needs attention.
//!
//! Read from the management API as the operator ([`gather`]); the rest is pure ([`evaluate`],
//! [`render`], [`prometheus`]). Dead letters are counted by reason by peeking at most `peek`
//! messages of each non-empty dead-letter queue through the management API
//! (`POST /api/queues/{vhost}/{queue}/get` with `ackmode = ack_requeue_true`): nothing is
//! consumed, the messages go back to their place, marked redelivered (dead-letter queues are
//! classic queues, which have no delivery limit). The management API's depths and rates are
//! those of its last statistics sample (every 5 s by default).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::dead_letter::DeadLetter;
use crate::management::{ConsumerInfo, Management, ManagementError, QueueInfo};

/// What `concord status` looks at.
#[derive(Debug, Clone)]
pub struct Request {
    pub vhost: String,
    pub namespace: String,
    /// The systems (from the policy); `None`: those with an inbox.
    pub systems: Option<Vec<String>>,
    /// An inbox or router queue with more ready messages needs attention.
    pub max_depth: Option<u64>,
    /// Most dead letters peeked per queue to count reasons.
    pub peek: usize,
    /// The router's `/metrics` URL.
    pub router_metrics: Option<String>,
    /// An inbox whose oldest ready message waited longer (seconds) needs attention.
    pub max_age: Option<u64>,
}

/// What the broker (and the router) said.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub queues: Vec<QueueInfo>,
    pub consumers: Vec<ConsumerInfo>,
    /// Per dead-letter queue, the reasons of the messages peeked.
    pub dead_reasons: BTreeMap<String, Vec<String>>,
    /// The router's metrics (Prometheus text), or why they could not be read.
    pub router_metrics: Option<Result<String, String>>,
    /// When it was observed (Unix seconds).
    pub now_unix_secs: u64,
}

/// One queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueStatus {
    pub queue: String,
    pub exists: bool,
    pub ready: u64,
    pub unacked: u64,
    pub consumers: u64,
    /// Messages in per second.
    pub publish_rate: Option<f64>,
    /// Messages delivered per second.
    pub deliver_rate: Option<f64>,
    /// How long the oldest ready message has waited, in seconds (messages the router
    /// published carry the time they were routed; classic queues only).
    pub oldest_ready_secs: Option<u64>,
    /// How long the ready messages would take to drain at the current delivery rate, in
    /// seconds (an estimate for every queue type, quorum queues included, which report no
    /// head-message timestamp); none when the inbox is empty or nothing is being delivered.
    pub drain_secs: Option<u64>,
}

/// A dead-letter queue, its reasons counted over the messages peeked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetters {
    pub queue: String,
    pub count: u64,
    pub by_reason: BTreeMap<String, u64>,
    /// Messages whose reason was read (at most `peek`).
    pub examined: u64,
}

/// One system.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemStatus {
    pub system: String,
    pub inbox: QueueStatus,
    pub dead_letters: DeadLetters,
}

/// A router input queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouterQueue {
    #[serde(flatten)]
    pub queue: QueueStatus,
    /// Connection of the single active consumer (partition queues).
    pub active_connection: Option<String>,
    /// Connections of every consumer.
    pub connections: Vec<String>,
}

/// The router's end-to-end lag (`concord_router_end_to_end_lag_seconds`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lag {
    pub events: u64,
    pub mean_seconds: f64,
    /// Upper bound of the histogram bucket holding the 99th percentile.
    pub p99_at_most_seconds: Option<f64>,
}

/// The router.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouterStatus {
    pub queues: Vec<RouterQueue>,
    pub dead_letters: DeadLetters,
    pub lag: Option<Lag>,
    /// The lag per source system (of the events each published).
    pub lag_by_source: BTreeMap<String, Lag>,
    /// Why the metrics could not be read.
    pub metrics_error: Option<String>,
}

/// The whole status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub namespace: String,
    pub systems: Vec<SystemStatus>,
    pub router: RouterStatus,
    /// What needs attention (the exit status is 1 when not empty).
    pub attention: Vec<String>,
}

impl Status {
    pub fn ok(&self) -> bool {
        self.attention.is_empty()
    }
}

fn queue_status(queues: &BTreeMap<&str, &QueueInfo>, name: &str, now: u64) -> QueueStatus {
    let q = queues.get(name);
    let stats = q.and_then(|q| q.message_stats.as_ref());
    QueueStatus {
        queue: name.to_owned(),
        exists: q.is_some(),
        ready: q.map_or(0, |q| q.messages_ready),
        unacked: q.map_or(0, |q| q.messages_unacknowledged),
        consumers: q.map_or(0, |q| q.consumers),
        publish_rate: stats.and_then(|s| s.publish_details).map(|r| r.rate),
        deliver_rate: stats.and_then(|s| s.deliver_get_details).map(|r| r.rate),
        oldest_ready_secs: q
            .filter(|q| q.messages_ready > 0)
            .and_then(|q| q.head_message_timestamp)
            .map(|t| now.saturating_sub(t)),
        drain_secs: q
            .filter(|q| q.messages_ready > 0)
            .zip(stats.and_then(|s| s.deliver_get_details))
            .filter(|(_, rate)| rate.rate > 0.0)
            .map(|(q, rate)| drain(q.messages_ready, rate.rate)),
    }
}

/// Seconds to deliver `ready` messages at `rate` per second, rounded up.
fn drain(ready: u64, rate: f64) -> u64 {
    // Depths and rates of a queue are far inside f64's exact range.
    (ready as f64 / rate).ceil() as u64
}

fn dead_letters(
    queues: &BTreeMap<&str, &QueueInfo>,
    reasons: &BTreeMap<String, Vec<String>>,
    name: &str,
) -> DeadLetters {
    let q = queue_status(queues, name, 0);
    let peeked = reasons.get(name).map(Vec::as_slice).unwrap_or_default();
    let mut by_reason = BTreeMap::new();
    for r in peeked {
        *by_reason.entry(r.clone()).or_insert(0) += 1;
    }
    DeadLetters {
        queue: name.to_owned(),
        count: q.ready + q.unacked,
        by_reason,
        examined: peeked.len() as u64,
    }
}

/// Whether `name` is a router input queue of namespace `ns` (`{ns}.router` or
/// `{ns}.router.p<N>`).
pub fn is_router_queue(ns: &str, name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(ns)
        .and_then(|r| r.strip_prefix(".router"))
    else {
        return false;
    };
    rest.is_empty()
        || rest
            .strip_prefix(".p")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The systems with an inbox in namespace `ns`.
pub fn systems_of(ns: &str, queues: &[QueueInfo]) -> Vec<String> {
    let prefix = format!("{ns}.inbox.");
    let mut systems: Vec<String> = queues
        .iter()
        .filter_map(|q| q.name.strip_prefix(&prefix).map(str::to_owned))
        .collect();
    systems.sort();
    systems
}

/// The status and what needs attention, from what was observed.
pub fn evaluate(request: &Request, observed: &Observed) -> Status {
    let ns = request.namespace.as_str();
    let queues: BTreeMap<&str, &QueueInfo> = observed
        .queues
        .iter()
        .map(|q| (q.name.as_str(), q))
        .collect();
    let systems = request
        .systems
        .clone()
        .unwrap_or_else(|| systems_of(ns, &observed.queues));
    let mut attention = Vec::new();
    let too_deep = |q: &QueueStatus| request.max_depth.is_some_and(|max| q.ready > max);
    let note_dead = |attention: &mut Vec<String>, d: &DeadLetters, whose: &str| {
        if d.count > 0 {
            let reasons: Vec<String> = d
                .by_reason
                .iter()
                .map(|(r, n)| format!("{r}: {n}"))
                .collect();
            attention.push(format!(
                "{whose}: {} dead letter(s) in {} ({}); see `concord dlq list --system {}`",
                d.count,
                d.queue,
                reasons.join(", "),
                whose.trim_start_matches("system ")
            ));
        }
    };
    let mut system_status = Vec::new();
    for system in &systems {
        let inbox = queue_status(
            &queues,
            &format!("{ns}.inbox.{system}"),
            observed.now_unix_secs,
        );
        let dead = dead_letters(
            &queues,
            &observed.dead_reasons,
            &format!("{ns}.dlq.{system}"),
        );
        if !inbox.exists {
            attention.push(format!(
                "system {system}: inbox {} does not exist (is the router running with it in its policy?)",
                inbox.queue
            ));
        } else if inbox.consumers == 0 {
            attention.push(format!(
                "system {system}: no consumer on its inbox ({} ready): its adapter is down or paused",
                inbox.ready
            ));
        }
        if let (Some(age), Some(max)) = (inbox.oldest_ready_secs, request.max_age)
            && age > max
        {
            attention.push(format!(
                "system {system}: its oldest ready message waited {age} s (more than --max-age {max})"
            ));
        }
        if too_deep(&inbox) {
            attention.push(format!(
                "system {system}: {} ready in its inbox (more than --max-depth {})",
                inbox.ready,
                request.max_depth.unwrap_or_default()
            ));
        }
        note_dead(&mut attention, &dead, &format!("system {system}"));
        system_status.push(SystemStatus {
            system: system.clone(),
            inbox,
            dead_letters: dead,
        });
    }
    let mut router_queues = Vec::new();
    for q in observed
        .queues
        .iter()
        .filter(|q| is_router_queue(ns, &q.name))
    {
        let status = queue_status(&queues, &q.name, observed.now_unix_secs);
        let consumers: Vec<&ConsumerInfo> = observed
            .consumers
            .iter()
            .filter(|c| c.queue.name == q.name)
            .collect();
        let active = consumers
            .iter()
            .find(|c| {
                c.activity_status.as_deref() == Some("single_active")
                    || q.single_active_consumer_tag.as_deref() == Some(c.consumer_tag.as_str())
            })
            .map(|c| c.channel_details.connection_name.clone());
        let mut connections: Vec<String> = consumers
            .iter()
            .map(|c| c.channel_details.connection_name.clone())
            .collect();
        connections.sort();
        if status.consumers == 0 {
            attention.push(format!(
                "router: no consumer on {} ({} ready): no router replica takes it",
                q.name, status.ready
            ));
        }
        if too_deep(&status) {
            attention.push(format!(
                "router: {} ready in {} (more than --max-depth {})",
                status.ready,
                q.name,
                request.max_depth.unwrap_or_default()
            ));
        }
        router_queues.push(RouterQueue {
            queue: status,
            active_connection: active,
            connections,
        });
    }
    if router_queues.is_empty() {
        attention.push(format!(
            "router: no input queue {ns}.router[.pN] (has the router ever run in this vhost?)"
        ));
    }
    let router_dead = dead_letters(&queues, &observed.dead_reasons, &format!("{ns}.dlq.router"));
    note_dead(&mut attention, &router_dead, "router");
    let (lag, lag_by_source, metrics_error) = match &observed.router_metrics {
        None => (None, BTreeMap::new(), None),
        Some(Ok(text)) => {
            let samples = prometheus(text);
            (lag(&samples), lag_by_source(&samples), None)
        }
        Some(Err(e)) => {
            attention.push(format!("router: metrics unreadable: {e}"));
            (None, BTreeMap::new(), Some(e.clone()))
        }
    };
    Status {
        namespace: ns.to_owned(),
        systems: system_status,
        router: RouterStatus {
            queues: router_queues,
            dead_letters: router_dead,
            lag,
            lag_by_source,
            metrics_error,
        },
        attention,
    }
}

/// One sample of a Prometheus text exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of a Prometheus (or OpenMetrics) text exposition; comments and lines it cannot
/// read are left out.
pub fn prometheus(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(sample)
        .collect()
}

fn sample(line: &str) -> Option<Sample> {
    let (head, rest) = match line.find('{') {
        Some(i) => {
            let close = line[i..].find('}')? + i;
            (&line[..close + 1], &line[close + 1..])
        }
        None => line.split_at(line.find(' ')?),
    };
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((name, labels)) => (name, labels.trim_end_matches('}')),
        None => (head, ""),
    };
    let mut map = BTreeMap::new();
    for pair in labels.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=')?;
        map.insert(k.trim().to_owned(), v.trim().trim_matches('"').to_owned());
    }
    Some(Sample {
        name: name.trim().to_owned(),
        labels: map,
        value,
    })
}

/// The router's end-to-end lag from its metrics, over every source (`None` before the first
/// event).
pub fn lag(samples: &[Sample]) -> Option<Lag> {
    lag_where(samples, |_| true)
}

/// The router's end-to-end lag per source system (`concord_router_end_to_end_lag_seconds`,
/// label `source`), for the sources with events.
pub fn lag_by_source(samples: &[Sample]) -> BTreeMap<String, Lag> {
    let sources: std::collections::BTreeSet<&str> = samples
        .iter()
        .filter(|s| s.name.starts_with(LAG))
        .filter_map(|s| s.labels.get("source").map(String::as_str))
        .collect();
    sources
        .into_iter()
        .filter_map(|source| {
            let l = lag_where(samples, |s| {
                s.labels.get("source").map(String::as_str) == Some(source)
            })?;
            Some((source.to_owned(), l))
        })
        .collect()
}

const LAG: &str = "concord_router_end_to_end_lag_seconds";

/// The lag over the samples `pick` takes (their counts, sums and buckets added up).
fn lag_where(samples: &[Sample], pick: impl Fn(&Sample) -> bool) -> Option<Lag> {
    let total = |suffix: &str| -> Option<f64> {
        let name = format!("{LAG}_{suffix}");
        samples
            .iter()
            .filter(|s| s.name == name && pick(s))
            .map(|s| s.value)
            .reduce(|a, b| a + b)
    };
    let count = total("count")?;
    if count < 1.0 {
        return None;
    }
    let sum = total("sum").unwrap_or(0.0);
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    let bucket = format!("{LAG}_bucket");
    for s in samples.iter().filter(|s| s.name == bucket && pick(s)) {
        let Some(le) = s.labels.get("le") else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            let Ok(b) = le.parse::<f64>() else { continue };
            b
        };
        // Keyed by the bound's bits (the same bound in every source's series).
        let entry = buckets.entry(bound.to_bits()).or_insert((bound, 0.0));
        entry.1 += s.value;
    }
    let mut buckets: Vec<(f64, f64)> = buckets.into_values().collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let p99 = buckets
        .iter()
        .find(|(_, cumulative)| *cumulative >= count * 0.99)
        .map(|(bound, _)| *bound)
        .filter(|b| b.is_finite());
    Some(Lag {
        events: count as u64,
        mean_seconds: sum / count,
        p99_at_most_seconds: p99,
    })
}

fn secs(s: Option<u64>) -> String {
    s.map_or_else(|| "-".to_owned(), |s| format!("{s}s"))
}

fn rate(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}"))
}

fn reasons(d: &DeadLetters) -> String {
    if d.count == 0 {
        return "0".to_owned();
    }
    let mut parts: Vec<String> = d
        .by_reason
        .iter()
        .map(|(r, n)| format!("{r}: {n}"))
        .collect();
    if d.examined < d.count {
        parts.push(format!("first {} read", d.examined));
    }
    format!("{} ({})", d.count, parts.join(", "))
}

/// The human-readable report.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let width = status
        .systems
        .iter()
        .map(|s| s.system.len())
        .max()
        .unwrap_or(0)
        .max("SYSTEM".len());
    let _ = writeln!(
        out,
        "{:<width$}  {:>7}  {:>7}  {:>9}  {:>6}  {:>6}  {:>6}  {:>6}  DEAD LETTERS",
        "SYSTEM", "READY", "UNACKED", "CONSUMERS", "IN/S", "OUT/S", "OLDEST", "DRAIN"
    );
    for s in &status.systems {
        let i = &s.inbox;
        let _ = writeln!(
            out,
            "{:<width$}  {:>7}  {:>7}  {:>9}  {:>6}  {:>6}  {:>6}  {:>6}  {}",
            s.system,
            i.ready,
            i.unacked,
            if i.exists {
                i.consumers.to_string()
            } else {
                "no inbox".to_owned()
            },
            rate(i.publish_rate),
            rate(i.deliver_rate),
            secs(i.oldest_ready_secs),
            match (i.ready, i.drain_secs, i.deliver_rate) {
                (0, _, _) => "-".to_owned(),
                (_, Some(d), _) => format!("~{d}s"),
                // Messages wait and none is being delivered.
                (_, None, Some(_)) => "never".to_owned(),
                (_, None, None) => "?".to_owned(),
            },
            reasons(&s.dead_letters)
        );
    }
    let qwidth = status
        .router
        .queues
        .iter()
        .map(|q| q.queue.queue.len())
        .max()
        .unwrap_or(0)
        .max("ROUTER QUEUE".len());
    let _ = writeln!(
        out,
        "\n{:<qwidth$}  {:>7}  {:>7}  {:>9}  {:>6}  ACTIVE CONSUMER",
        "ROUTER QUEUE", "READY", "UNACKED", "CONSUMERS", "IN/S"
    );
    for q in &status.router.queues {
        let active = q
            .active_connection
            .clone()
            .unwrap_or_else(|| q.connections.join(", "));
        let _ = writeln!(
            out,
            "{:<qwidth$}  {:>7}  {:>7}  {:>9}  {:>6}  {}",
            q.queue.queue,
            q.queue.ready,
            q.queue.unacked,
            q.queue.consumers,
            rate(q.queue.publish_rate),
            if active.is_empty() { "-" } else { &active }
        );
    }
    let _ = writeln!(
        out,
        "router dead letters: {}",
        reasons(&status.router.dead_letters)
    );
    let said = |l: &Lag| {
        format!(
            "mean {:.3} s{} over {} events",
            l.mean_seconds,
            l.p99_at_most_seconds
                .map(|p| format!(", p99 <= {p} s"))
                .unwrap_or_default(),
            l.events
        )
    };
    match &status.router.lag {
        Some(l) => {
            let _ = writeln!(out, "end-to-end lag: {}", said(l));
            for (source, l) in &status.router.lag_by_source {
                let _ = writeln!(out, "  from {source}: {}", said(l));
            }
        }
        None if status.router.metrics_error.is_none() => {}
        None => {
            let _ = writeln!(out, "end-to-end lag: unknown");
        }
    }
    if status.attention.is_empty() {
        out.push_str("\nall well");
    } else {
        out.push_str("\nneeds attention:");
        for a in &status.attention {
            let _ = write!(out, "\n  - {a}");
        }
    }
    out
}

/// Reads the broker's state (and the router's metrics) for [`evaluate`].
pub fn gather(m: &Management, request: &Request) -> Result<Observed, ManagementError> {
    let ns = &request.namespace;
    let queues: Vec<QueueInfo> = m
        .queues(&request.vhost)?
        .into_iter()
        .filter(|q| q.name.starts_with(&format!("{ns}.")))
        .collect();
    let consumers = m.consumers(&request.vhost)?;
    let mut dead_reasons = BTreeMap::new();
    for q in &queues {
        let is_dlq = q.name.starts_with(&format!("{ns}.dlq."));
        if is_dlq && q.messages_ready > 0 && request.peek > 0 {
            let peeked = m.peek(&request.vhost, &q.name, request.peek)?;
            let reasons = peeked
                .iter()
                .map(|p| {
                    DeadLetter::new(|h| p.header(h).map(str::to_owned), None, None, Vec::new())
                        .reason
                        .unwrap_or_else(|| "unknown".to_owned())
                })
                .collect();
            dead_reasons.insert(q.name.clone(), reasons);
        }
    }
    let router_metrics = request.router_metrics.as_deref().map(fetch_text);
    Ok(Observed {
        queues,
        consumers,
        dead_reasons,
        router_metrics,
        now_unix_secs: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

fn fetch_text(url: &str) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    agent
        .get(url)
        .call()
        .map_err(|e| format!("{url}: {e}"))?
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("{url}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::management::{ChannelDetails, MessageStats, NameRef, Rate};

    fn queue(name: &str, ready: u64, consumers: u64) -> QueueInfo {
        QueueInfo {
            name: name.into(),
            messages_ready: ready,
            consumers,
            ..QueueInfo::default()
        }
    }

    fn request() -> Request {
        Request {
            vhost: "v".into(),
            namespace: "ns".into(),
            systems: None,
            max_depth: Some(100),
            max_age: Some(60),
            peek: 10,
            router_metrics: None,
        }
    }

    #[test]
    fn router_queues_are_recognised() {
        assert!(is_router_queue("ns", "ns.router"));
        assert!(is_router_queue("ns", "ns.router.p12"));
        assert!(!is_router_queue("ns", "ns.router.p"));
        assert!(!is_router_queue("ns", "ns.routed"));
        assert!(!is_router_queue("ns", "other.router"));
    }

    #[test]
    fn a_healthy_deployment_needs_no_attention() {
        let mut inbox = queue("ns.inbox.crm", 3, 1);
        inbox.message_stats = Some(MessageStats {
            publish_details: Some(Rate { rate: 2.0 }),
            deliver_get_details: Some(Rate { rate: 1.5 }),
        });
        let observed = Observed {
            queues: vec![
                inbox,
                queue("ns.dlq.crm", 0, 0),
                queue("ns.router", 0, 1),
                queue("ns.dlq.router", 0, 0),
            ],
            ..Observed::default()
        };
        let s = evaluate(&request(), &observed);
        assert!(s.ok(), "{:?}", s.attention);
        assert_eq!(s.systems[0].system, "crm");
        assert_eq!(s.systems[0].inbox.publish_rate, Some(2.0));
        let table = render(&s);
        assert!(table.contains("crm"), "{table}");
        assert!(table.ends_with("all well"), "{table}");
    }

    #[test]
    fn what_needs_attention() {
        let observed = Observed {
            queues: vec![
                queue("ns.inbox.crm", 500, 0),
                queue("ns.dlq.crm", 3, 0),
                queue("ns.router.p0", 0, 2),
                queue("ns.router.p1", 0, 0),
                queue("ns.dlq.router", 0, 0),
            ],
            consumers: vec![
                ConsumerInfo {
                    consumer_tag: "a".into(),
                    queue: NameRef {
                        name: "ns.router.p0".into(),
                    },
                    channel_details: ChannelDetails {
                        connection_name: "router-0".into(),
                        user: "router".into(),
                    },
                    activity_status: Some("single_active".into()),
                    active: Some(true),
                },
                ConsumerInfo {
                    consumer_tag: "b".into(),
                    queue: NameRef {
                        name: "ns.router.p0".into(),
                    },
                    channel_details: ChannelDetails {
                        connection_name: "router-1".into(),
                        user: "router".into(),
                    },
                    activity_status: Some("waiting".into()),
                    active: Some(false),
                },
            ],
            dead_reasons: [(
                "ns.dlq.crm".to_owned(),
                vec!["apply_failed".into(), "apply_failed".into()],
            )]
            .into(),
            router_metrics: None,
            now_unix_secs: 0,
        };
        let mut r = request();
        r.systems = Some(vec!["crm".into(), "erp".into()]);
        let s = evaluate(&r, &observed);
        assert_eq!(s.attention.len(), 5, "{:#?}", s.attention);
        assert!(s.attention[0].contains("no consumer on its inbox"));
        assert!(s.attention[1].contains("more than --max-depth 100"));
        assert!(s.attention[2].contains("3 dead letter(s)"));
        assert!(s.attention[3].contains("erp: inbox ns.inbox.erp does not exist"));
        assert!(s.attention[4].contains("no consumer on ns.router.p1"));
        assert_eq!(
            s.systems[0].dead_letters.by_reason,
            [("apply_failed".to_owned(), 2)].into()
        );
        assert_eq!(
            s.router.queues[0].active_connection.as_deref(),
            Some("router-0")
        );
        let table = render(&s);
        assert!(
            table.contains("3 (apply_failed: 2, first 2 read)"),
            "{table}"
        );
        assert!(table.contains("router-0"), "{table}");
    }

    /// How long an inbox's oldest ready message waited comes from its head message's
    /// timestamp (the time the router routed it); past `--max-age` its system is behind.
    #[test]
    fn an_inbox_whose_oldest_message_waited_too_long_is_behind() {
        let mut slow = queue("ns.inbox.crm", 40, 1);
        slow.head_message_timestamp = Some(1_000);
        let mut quick = queue("ns.inbox.erp", 2, 1);
        quick.head_message_timestamp = Some(1_095);
        // A timestamp left at the head of an empty queue means nothing.
        let mut empty = queue("ns.inbox.wms", 0, 1);
        empty.head_message_timestamp = Some(10);
        let observed = Observed {
            queues: vec![slow, quick, empty, queue("ns.router", 0, 1)],
            now_unix_secs: 1_100,
            ..Observed::default()
        };
        let s = evaluate(&request(), &observed);
        let ages: Vec<Option<u64>> = s
            .systems
            .iter()
            .map(|s| s.inbox.oldest_ready_secs)
            .collect();
        assert_eq!(ages, [Some(100), Some(5), None]);
        assert_eq!(s.attention.len(), 1, "{:#?}", s.attention);
        assert!(
            s.attention[0]
                .contains("crm: its oldest ready message waited 100 s (more than --max-age 60)"),
            "{:?}",
            s.attention
        );
        let table = render(&s);
        assert!(table.contains("OLDEST"), "{table}");
        assert!(table.contains("100s"), "{table}");
    }

    /// Every queue type gets an estimate of how long its ready messages take to drain at the
    /// current delivery rate (quorum queues have no head-message timestamp, so no OLDEST).
    #[test]
    fn an_inbox_tells_how_long_its_backlog_takes_to_drain() {
        let with_rate = |name: &str, ready: u64, rate: Option<f64>| {
            let mut q = queue(name, ready, 1);
            q.message_stats = Some(MessageStats {
                publish_details: None,
                deliver_get_details: rate.map(|rate| Rate { rate }),
            });
            q
        };
        let observed = Observed {
            queues: vec![
                with_rate("ns.inbox.crm", 1_000, Some(40.0)),
                with_rate("ns.inbox.erp", 7, Some(0.0)),
                with_rate("ns.inbox.wms", 0, Some(5.0)),
                with_rate("ns.inbox.pos", 3, None),
                queue("ns.router", 0, 1),
            ],
            ..Observed::default()
        };
        let mut r = request();
        r.systems = Some(vec!["crm".into(), "erp".into(), "wms".into(), "pos".into()]);
        let s = evaluate(&r, &observed);
        let drains: Vec<Option<u64>> = s.systems.iter().map(|s| s.inbox.drain_secs).collect();
        assert_eq!(drains, [Some(25), None, None, None]);
        let table = render(&s);
        let line = |system: &str| {
            table
                .lines()
                .find(|l| l.starts_with(system))
                .unwrap_or_default()
                .split_whitespace()
                .nth(7)
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(
            [line("crm"), line("erp"), line("wms"), line("pos")],
            ["~25s", "never", "-", "?"],
            "{table}"
        );
    }

    #[test]
    fn lag_comes_from_the_routers_histogram() {
        let text = "# HELP concord_router_end_to_end_lag_seconds Time\n\
            # TYPE concord_router_end_to_end_lag_seconds histogram\n\
            concord_router_end_to_end_lag_seconds_sum 2.0\n\
            concord_router_end_to_end_lag_seconds_count 100\n\
            concord_router_end_to_end_lag_seconds_bucket{le=\"0.01\"} 50\n\
            concord_router_end_to_end_lag_seconds_bucket{le=\"0.1\"} 99\n\
            concord_router_end_to_end_lag_seconds_bucket{le=\"+Inf\"} 100\n\
            concord_router_dead_lettered_total{reason=\"undecodable\"} 1\n";
        let samples = prometheus(text);
        assert_eq!(samples.len(), 6);
        assert_eq!(samples[5].labels["reason"], "undecodable");
        let l = lag(&samples).unwrap();
        assert_eq!(l.events, 100);
        assert!((l.mean_seconds - 0.02).abs() < 1e-9);
        assert_eq!(l.p99_at_most_seconds, Some(0.1));
        assert_eq!(
            lag(&prometheus(
                "concord_router_end_to_end_lag_seconds_count 0\n"
            )),
            None
        );
    }

    /// With a series per source system, the lag is over all of them, and per source.
    #[test]
    fn lag_is_added_up_over_sources_and_told_per_source() {
        let text = "concord_router_end_to_end_lag_seconds_sum{source=\"orders\"} 1.0\n\
            concord_router_end_to_end_lag_seconds_count{source=\"orders\"} 100\n\
            concord_router_end_to_end_lag_seconds_bucket{le=\"0.01\",source=\"orders\"} 100\n\
            concord_router_end_to_end_lag_seconds_bucket{le=\"1\",source=\"orders\"} 100\n\
            concord_router_end_to_end_lag_seconds_bucket{le=\"+Inf\",source=\"orders\"} 100\n\
            concord_router_end_to_end_lag_seconds_sum{source=\"support\"} 50.0\n\
            concord_router_end_to_end_lag_seconds_count{source=\"support\"} 100\n\
            concord_router_end_to_end_lag_seconds_bucket{le=\"0.01\",source=\"support\"} 0\n\
            concord_router_end_to_end_lag_seconds_bucket{le=\"1\",source=\"support\"} 100\n\
            concord_router_end_to_end_lag_seconds_bucket{le=\"+Inf\",source=\"support\"} 100\n\
            concord_router_end_to_end_lag_seconds_sum{source=\"delivery\"} 0\n\
            concord_router_end_to_end_lag_seconds_count{source=\"delivery\"} 0\n";
        let samples = prometheus(text);
        let all = lag(&samples).unwrap();
        assert_eq!(all.events, 200);
        assert!((all.mean_seconds - 0.255).abs() < 1e-9);
        assert_eq!(all.p99_at_most_seconds, Some(1.0));
        let by = lag_by_source(&samples);
        assert_eq!(by.keys().collect::<Vec<_>>(), ["orders", "support"]);
        assert_eq!(by["orders"].p99_at_most_seconds, Some(0.01));
        assert!((by["support"].mean_seconds - 0.5).abs() < 1e-9);
        let observed = Observed {
            queues: vec![queue("ns.router", 0, 1)],
            router_metrics: Some(Ok(text.to_owned())),
            ..Observed::default()
        };
        let table = render(&evaluate(&request(), &observed));
        assert!(
            table.contains("end-to-end lag: mean 0.255 s, p99 <= 1 s over 200 events\n  from orders: mean 0.010 s, p99 <= 0.01 s over 100 events\n  from support: mean 0.500 s, p99 <= 1 s over 100 events"),
            "{table}"
        );
    }
}
