//! `concord dlq redrive`: moves dead letters back where they came from (see
//! [`crate::dead_letter`] for where that is and as whom), over AMQP through `concord-amqp`.
//!
//! Move-then-ack: each selected dead letter is published (mandatory, persistent) and only once
//! the broker confirmed it is the dead letter acknowledged; an interrupted redrive leaves the
//! dead letter in its queue, and redriving it again is harmless (same event id: the receiving
//! adapter's deduplication drops the second copy). Dead letters that are not selected stay
//! where they are, in their order. At most the messages in the queue when the redrive starts
//! are looked at (those dead-lettered again meanwhile wait for the next redrive), at most
//! `limit` are moved, at most `rate` per second.

use std::time::Duration;

use concord_amqp::{AmqpError, MessageProps, PublishError, Publisher, PublisherOptions};
use futures::StreamExt as _;
use serde::Serialize;

use crate::dead_letter::{self, DeadLetter, Dlq, HEADER_REDRIVEN_FROM, Skip, Summary};

/// Most dead letters one redrive looks at (the prefetch holds the skipped ones).
pub const MAX_SCAN: u32 = 10_000;

/// How long to wait for the next delivery before deciding the queue changed under us.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A redrive that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedriveError {
    #[error("{0}")]
    Amqp(#[from] AmqpError),
    #[error("publishing a dead letter again: {0}")]
    Publish(#[from] PublishError),
}

/// What to redrive.
#[derive(Debug, Clone)]
pub struct Request {
    pub namespace: String,
    pub dlq: Dlq,
    pub reason: Option<String>,
    /// For the router's DLQ: the system whose dead letters are redriven (and whose user
    /// `publisher_uri` logs in as).
    pub source: Option<String>,
    pub limit: Option<usize>,
    /// Messages per second (`None`: as fast as confirms come).
    pub rate: Option<f64>,
    /// Reads (and acks) the dead letters: the operator.
    pub reader_uri: String,
    /// Publishes them again: the router's user for a system's DLQ, the source system's user
    /// for the router's.
    pub publisher_uri: String,
}

/// What a redrive did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub queue: String,
    /// Messages in the queue when the redrive started.
    pub depth: u32,
    pub moved: Vec<Summary>,
    pub skipped: Vec<Skipped>,
}

/// A dead letter left in its queue, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    #[serde(flatten)]
    pub dead_letter: Summary,
    pub skip: Skip,
}

/// Runs the redrive.
pub async fn redrive(request: &Request) -> Result<Report, RedriveError> {
    let queue = request.dlq.queue(&request.namespace);
    let reader = concord_amqp::connect(
        &request.reader_uri,
        &concord_amqp::connection_name("concord-dlq-redrive"),
    )
    .await?;
    let result = redrive_on(&reader, request, &queue).await;
    // Closing the channel returns what was skipped (never acked) to the queue.
    let _ = reader.close().await;
    result
}

async fn redrive_on(
    reader: &concord_amqp::Connection,
    request: &Request,
    queue: &str,
) -> Result<Report, RedriveError> {
    let channel = reader.open_channel().await?;
    let depth = concord_amqp::queue_message_count(&channel, queue).await?;
    let mut report = Report {
        queue: queue.to_owned(),
        depth,
        ..Report::default()
    };
    let scan = depth.min(MAX_SCAN);
    if scan == 0 || request.limit == Some(0) {
        return Ok(report);
    }
    let publish_conn = concord_amqp::connect(
        &request.publisher_uri,
        &concord_amqp::connection_name("concord-dlq-redrive-publish"),
    )
    .await?;
    let user_id = concord_amqp::login_of(&request.publisher_uri)?;
    let publisher = Publisher::open(&publish_conn, PublisherOptions::default()).await?;
    let prefetch = u16::try_from(scan).unwrap_or(u16::MAX);
    let tag = format!("concord-dlq-redrive-{}", std::process::id());
    let mut consumer = concord_amqp::consume(&channel, queue, &tag, prefetch).await?;
    let interval = request
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next_slot = tokio::time::Instant::now();
    let mut held = Vec::new();
    let mut seen = 0u32;
    let result: Result<(), RedriveError> = async {
        while seen < scan && request.limit.is_none_or(|l| report.moved.len() < l) {
            let delivery = match tokio::time::timeout(DELIVERY_TIMEOUT, consumer.next()).await {
                Ok(Some(d)) => d?,
                // The queue shrank under us (another reader): stop here.
                Ok(None) | Err(_) => break,
            };
            seen += 1;
            let dead = DeadLetter::new(
                |n| delivery.header_str(n).map(str::to_owned),
                delivery.message_id().map(str::to_owned),
                delivery.timestamp(),
                delivery.body.clone(),
            );
            let to = match dead_letter::destination(
                &request.namespace,
                &request.dlq,
                &dead,
                request.reason.as_deref(),
                request.source.as_deref(),
            ) {
                Ok(to) => to,
                Err(skip) => {
                    report.skipped.push(Skipped {
                        dead_letter: dead.summary(),
                        skip,
                    });
                    held.push(delivery);
                    continue;
                }
            };
            if let Some(interval) = interval {
                tokio::time::sleep_until(next_slot).await;
                next_slot = tokio::time::Instant::now() + interval;
            }
            let mut props = MessageProps::new()
                .user_id(&user_id)
                .header(HEADER_REDRIVEN_FROM, queue)
                .timestamp_now();
            if let Some(id) = &to.message_id {
                props = props.message_id(id);
            }
            if let Some(key) = &to.key_header {
                props = props.header(concord_amqp::HEADER_KEY, key);
            }
            publisher
                .publish_confirmed(&to.exchange, &to.routing_key, &dead.body, props)
                .await?;
            delivery.ack().await?;
            report.moved.push(dead.summary());
        }
        Ok(())
    }
    .await;
    let _ = consumer.cancel().await;
    drop(held);
    let _ = publisher.close().await;
    let _ = publish_conn.close().await;
    result.map(|()| report)
}
