//! `concord status`, `concord dlq list|show|redrive`, `concord pause|resume`: the operator's
//! day-two commands. Everything broker-facing is `concord_admin`'s (status, dead_letter,
//! redrive, pause); this module parses, loads the deployment when asked, and prints.

use std::path::Path;

use anyhow::Context;
use base64::Engine as _;
use concord_admin::dead_letter::{DeadLetter, Dlq};
use concord_admin::management::Management;
use concord_admin::{pause, redrive, status};
use prost_reflect::DynamicMessage;

use crate::explain::load_deployment;

/// How to reach the broker as the operator.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Broker {
    /// The RabbitMQ management API.
    #[arg(
        long,
        env = "CONCORD_MANAGEMENT_URL",
        default_value = "http://127.0.0.1:15672"
    )]
    pub management_url: String,
    /// The operator's broker user (`concord broker-defs --operator-user`); pause and resume
    /// need a user with the `administrator` tag.
    #[arg(long, env = "CONCORD_OPERATOR_USER", default_value = "operator")]
    pub user: String,
    /// Its password.
    #[arg(
        long,
        env = "CONCORD_OPERATOR_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub password: String,
    /// The vhost Concord runs in.
    #[arg(long, env = "CONCORD_VHOST", default_value = "/")]
    pub vhost: String,
    /// The namespace of Concord's exchanges and queues (the router's `namespace`).
    #[arg(long, env = "CONCORD_NAMESPACE", default_value = "concord")]
    pub namespace: String,
}

impl Broker {
    fn management(&self) -> Management {
        Management::new(&self.management_url, &self.user, &self.password)
    }
}

/// `concord status`: the report and whether all is well.
pub(crate) fn status(
    broker: &Broker,
    policy: Option<&Path>,
    (max_depth, max_age): (Option<u64>, Option<u64>),
    router_metrics: Option<String>,
    peek: usize,
    json: bool,
) -> anyhow::Result<(String, bool)> {
    let systems = match policy {
        Some(p) => Some(load_deployment(p)?.policy.systems().to_vec()),
        None => None,
    };
    let request = status::Request {
        vhost: broker.vhost.clone(),
        namespace: broker.namespace.clone(),
        systems,
        max_depth,
        max_age,
        peek,
        router_metrics,
    };
    let observed =
        status::gather(&broker.management(), &request).context("reading the broker's state")?;
    let s = status::evaluate(&request, &observed);
    let out = if json {
        serde_json::to_string(&s)?
    } else {
        status::render(&s)
    };
    Ok((out, s.ok()))
}

/// Dead letters of `system`'s (or the router's) DLQ, peeked through the management API.
fn peek(
    broker: &Broker,
    system: &str,
    reason: Option<&str>,
    limit: usize,
    scan: usize,
) -> anyhow::Result<Vec<DeadLetter>> {
    let queue = Dlq::parse(system).queue(&broker.namespace);
    let peeked = broker
        .management()
        .peek(&broker.vhost, &queue, scan.max(limit))
        .with_context(|| format!("reading {queue}"))?;
    Ok(peeked
        .iter()
        .map(|p| {
            DeadLetter::new(
                |h| p.header(h).map(str::to_owned),
                p.properties.message_id.clone(),
                p.properties.timestamp,
                p.body().unwrap_or_default(),
            )
        })
        .filter(|d| d.has_reason(reason))
        .take(limit)
        .collect())
}

/// `concord dlq list`.
pub(crate) fn dlq_list(
    broker: &Broker,
    system: &str,
    reason: Option<&str>,
    limit: usize,
    scan: usize,
    json: bool,
) -> anyhow::Result<String> {
    let dead = peek(broker, system, reason, limit, scan)?;
    let summaries: Vec<_> = dead.iter().map(DeadLetter::summary).collect();
    if json {
        return Ok(serde_json::to_string(&summaries)?);
    }
    let mut out = format!(
        "{:<24}  {:<32}  {:<36}  {:<10}  DETAIL",
        "REASON", "RECORD", "EVENT ID", "TIME"
    );
    for s in &summaries {
        out.push_str(&format!(
            "\n{:<24}  {:<32}  {:<36}  {:<10}  {}",
            s.reason,
            s.key.as_deref().unwrap_or("-"),
            s.event_id.as_deref().unwrap_or("-"),
            s.time.map_or_else(|| "-".to_owned(), |t| t.to_string()),
            s.detail
        ));
    }
    out.push_str(&format!(
        "\n{} dead letter(s) in {}",
        summaries.len(),
        Dlq::parse(system).queue(&broker.namespace)
    ));
    Ok(out)
}

/// `concord dlq show`: each dead letter as one JSON object per line, the envelope decoded and,
/// with a policy, the record decoded with the message the policy names for its entity.
pub(crate) fn dlq_show(
    broker: &Broker,
    system: &str,
    reason: Option<&str>,
    limit: usize,
    scan: usize,
    policy: Option<&Path>,
) -> anyhow::Result<String> {
    let policy = match policy {
        Some(p) => Some(load_deployment(p)?.policy),
        None => None,
    };
    let dead = peek(broker, system, reason, limit, scan)?;
    let mut lines = Vec::new();
    for d in &dead {
        let mut obj = serde_json::json!({
            "reason": d.reason,
            "detail": d.detail,
            "routing_key": d.routing_key,
            "time": d.timestamp,
        });
        match &d.event {
            Some(event) => {
                let mut envelope = envelope_json(&d.body)?;
                if let Some(entity) = policy.as_ref().and_then(|p| p.entity(&event.entity)) {
                    let record =
                        DynamicMessage::decode(entity.message.clone(), event.record.as_slice())
                            .map(|m| serde_json::to_value(&m))
                            .map_err(|e| e.to_string());
                    envelope["record"] = match record {
                        Ok(Ok(v)) => v,
                        Ok(Err(e)) => serde_json::json!({ "undecodable": e.to_string() }),
                        Err(e) => serde_json::json!({ "undecodable": e }),
                    };
                    envelope["record_message"] = entity.message.full_name().into();
                }
                obj["event"] = envelope;
            }
            None => match serde_json::from_slice::<serde_json::Value>(&d.body) {
                // A parked local change is a JSON description.
                Ok(v) => obj["parked"] = v,
                Err(_) => {
                    obj["body_base64"] = base64::engine::general_purpose::STANDARD
                        .encode(&d.body)
                        .into();
                }
            },
        }
        lines.push(serde_json::to_string(&obj)?);
    }
    Ok(lines.join("\n"))
}

/// The change event in `body` as JSON (bytes as base64), as `concord.v1.ChangeEvent` defines
/// it.
fn envelope_json(body: &[u8]) -> anyhow::Result<serde_json::Value> {
    let descriptor = concord_proto::descriptor_pool()
        .get_message_by_name("concord.v1.ChangeEvent")
        .context("the envelope's descriptor")?;
    let message = DynamicMessage::decode(descriptor, body)?;
    Ok(serde_json::to_value(&message)?)
}

/// `concord dlq redrive`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dlq_redrive(
    broker: &Broker,
    system: &str,
    reason: Option<String>,
    limit: Option<usize>,
    rate: Option<f64>,
    source: Option<String>,
    amqp_uri: String,
    publisher_uri: Option<String>,
    json: bool,
) -> anyhow::Result<String> {
    let dlq = Dlq::parse(system);
    let publisher_uri = publisher_uri.with_context(|| match dlq {
        Dlq::Router => "redriving the router's dead letters publishes them as their source system: give --source S and that system's AMQP URI (--source-uri or CONCORD_SOURCE_AMQP_URI)".to_owned(),
        Dlq::System(_) => "redriving a system's dead letters publishes them into its inbox as the router: give the router's AMQP URI (--router-uri or CONCORD_ROUTER_AMQP_URI)".to_owned(),
    })?;
    if dlq == Dlq::Router && source.is_none() {
        anyhow::bail!(
            "redriving the router's dead letters needs --source S (the system whose changes they are)"
        );
    }
    let request = redrive::Request {
        namespace: broker.namespace.clone(),
        dlq,
        reason,
        source,
        limit,
        rate,
        reader_uri: amqp_uri,
        publisher_uri,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(redrive::redrive(&request))?;
    if json {
        return Ok(serde_json::to_string(&report)?);
    }
    let mut out = format!(
        "moved {} of {} dead letter(s) from {}",
        report.moved.len(),
        report.depth,
        report.queue
    );
    for m in &report.moved {
        out.push_str(&format!(
            "\n  moved   {:<24} {} {}",
            m.reason,
            m.key.as_deref().unwrap_or("-"),
            m.event_id.as_deref().unwrap_or("-")
        ));
    }
    for s in &report.skipped {
        out.push_str(&format!(
            "\n  left    {:<24} {} {}: {}",
            s.dead_letter.reason,
            s.dead_letter.key.as_deref().unwrap_or("-"),
            s.dead_letter.event_id.as_deref().unwrap_or("-"),
            s.skip.describe()
        ));
    }
    Ok(out)
}

/// `concord pause` (`pause = true`) and `concord resume`.
pub(crate) fn pause_resume(
    broker: &Broker,
    system: &str,
    broker_user: Option<&str>,
    settle_secs: u64,
    pause: bool,
    json: bool,
) -> anyhow::Result<String> {
    let target = pause::Target {
        vhost: &broker.vhost,
        namespace: &broker.namespace,
        system,
        user: broker_user,
        settle: std::time::Duration::from_secs(settle_secs),
        timeout: std::time::Duration::from_secs(settle_secs.saturating_mul(4).max(30)),
    };
    let m = broker.management();
    let outcome = if pause {
        pause::pause(&m, &target)?
    } else {
        pause::resume(&m, &target)?
    };
    if json {
        return Ok(serde_json::to_string(&outcome)?);
    }
    Ok(if pause {
        format!(
            "system {system} paused (broker user {:?} may no longer consume {}.inbox.{system}; {} connection(s) closed); its inbox accumulates until `concord resume --system {system}`",
            outcome.user, broker.namespace, outcome.closed_connections
        )
    } else {
        format!(
            "system {system} resumed (broker user {:?} may consume its inbox again); its adapter catches up at its next reconnect",
            outcome.user
        )
    })
}
