//! `concord resync`: asks the router to backfill one system and follows the owners' progress.
//! The broker work is `concord_router::control`; this module parses, times and prints.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use concord_proto::v1::{ResyncProgress, ResyncRequest};

/// What to resync, and where.
#[derive(Debug)]
pub struct Request {
    pub amqp_uri: String,
    pub namespace: String,
    pub system: String,
    pub entity: Option<String>,
    pub key: Option<String>,
    /// How long to wait for the router's answer.
    pub timeout: Duration,
    /// Return once the router accepted the request, without following the progress.
    pub no_wait: bool,
}

/// One system's progress as last reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    done: u64,
    total: u64,
}

/// A progress line: records done / total, rate and estimated time left (pure).
fn progress_line(system: &str, done: u64, total: u64, elapsed: Duration, finished: bool) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = done as f64 / secs;
    let percent = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let eta = if finished {
        "done".to_owned()
    } else if rate > 0.0 {
        format!("ETA {:.0} s", total.saturating_sub(done) as f64 / rate)
    } else {
        "ETA unknown".to_owned()
    };
    format!("{system}: {done}/{total} records ({percent:.0}%), {rate:.0} records/s, {eta}")
}

/// Sends the request and prints the progress until every owner finished; returns the summary.
pub fn run(request: &Request) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(follow(request))
}

async fn follow(request: &Request) -> anyhow::Result<String> {
    let topology = concord_amqp::Topology::new(request.namespace.clone());
    let id = uuid::Uuid::now_v7().to_string();
    let started = Instant::now();
    let mut watch = concord_router::control::request_resync(
        &request.amqp_uri,
        &concord_amqp::ConnectOptions::default(),
        &topology,
        ResyncRequest {
            id: id.clone(),
            target: request.system.clone(),
            entity: request.entity.clone().unwrap_or_default(),
            key: request.key.clone().unwrap_or_default(),
        },
        request.timeout,
    )
    .await
    .context("resync request")?;
    let what = match (&request.entity, &request.key) {
        (Some(e), Some(k)) => format!("record {e}/{k}"),
        (Some(e), None) => format!("entity {e}"),
        _ => "every entity it sees".to_owned(),
    };
    eprintln!(
        "resync {id} of {} ({what}): snapshots from {}",
        request.system,
        if watch.systems.is_empty() {
            "nobody (it sees nothing)".to_owned()
        } else {
            watch.systems.join(", ")
        }
    );
    if request.no_wait {
        let systems = watch.systems.join(", ");
        watch.close().await;
        return Ok(format!("resync {id} requested from {systems}"));
    }
    let mut finished = BTreeSet::new();
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    while let Some(p) = watch.next(&finished).await? {
        let ResyncProgress {
            system,
            done,
            total,
            finished: over,
            ..
        } = p;
        eprintln!(
            "{}",
            progress_line(&system, done, total, started.elapsed(), over)
        );
        seen.insert(system.clone(), Seen { done, total });
        if over {
            finished.insert(system);
        }
    }
    watch.close().await;
    let records: u64 = seen.values().map(|s| s.done).sum();
    Ok(format!(
        "resync {id} of {}: {records} records published by {} system(s) in {:.1} s",
        request.system,
        seen.len(),
        started.elapsed().as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_line_has_the_count_the_rate_and_the_time_left() {
        assert_eq!(
            progress_line("orders", 500, 2000, Duration::from_secs(2), false),
            "orders: 500/2000 records (25%), 250 records/s, ETA 6 s"
        );
        assert_eq!(
            progress_line("orders", 2000, 2000, Duration::from_secs(4), true),
            "orders: 2000/2000 records (100%), 500 records/s, done"
        );
        assert_eq!(
            progress_line("support", 0, 0, Duration::ZERO, true),
            "support: 0/0 records (100%), 0 records/s, done"
        );
    }
}
