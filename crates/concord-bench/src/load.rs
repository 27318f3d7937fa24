//! The load generator (publishers in the adapter role) and the subscribers (one consumer per
//! inbox, acknowledging in batches). Both are the same for the router and the baseline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use concord_amqp::{AckBatcher, Connection, MessageProps, PendingConfirm, Publisher, consume};
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::event::{self, EventFactory};

/// A subscriber that receives nothing for this long fails the run.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

pub use concord_amqp::now_ms;

/// When each event was handed to its publisher, for end-to-end latency.
#[derive(Debug)]
pub struct SendClock {
    base: Instant,
    /// Nanoseconds since `base`, plus one (0: not sent yet).
    sent: Vec<AtomicU64>,
}

impl SendClock {
    pub fn new(events: u64) -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            sent: (0..events).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn nanos_since_base(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    fn mark(&self, seq: u64, at: Instant) {
        if let Some(slot) = usize::try_from(seq).ok().and_then(|i| self.sent.get(i)) {
            slot.store(self.nanos_since_base(at) + 1, Ordering::Relaxed);
        }
    }

    /// Microseconds from sending `seq` to `received`.
    fn latency_us(&self, seq: u64, received: Instant) -> Option<u32> {
        let slot = usize::try_from(seq).ok().and_then(|i| self.sent.get(i))?;
        let sent = slot.load(Ordering::Relaxed).checked_sub(1)?;
        let us = self.nanos_since_base(received).saturating_sub(sent) / 1_000;
        Some(u32::try_from(us).unwrap_or(u32::MAX))
    }
}

/// How events are offered.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// As fast as the confirm windows allow.
    Flat,
    /// Open loop at this many events per second (deadline scheduling: every event has a due
    /// time `start + seq / rate`; a late wake-up sends everything due at once).
    Rate(f64),
}

/// Publishes events `0..n` to `exchange` as broker user `user_id` through `publishers` (round
/// robin) and waits for
/// every confirm. Each publisher's confirms are awaited by a task of its own, so publishing
/// is pipelined up to the window.
pub async fn publish(
    publishers: &[Publisher],
    factory: &Arc<EventFactory>,
    exchange: &str,
    user_id: &str,
    n: u64,
    pace: Pace,
    clock: Option<Arc<SendClock>>,
) -> anyhow::Result<()> {
    if publishers.is_empty() {
        bail!("no publisher");
    }
    let mut checkers = Vec::with_capacity(publishers.len());
    let mut senders = Vec::with_capacity(publishers.len());
    for _ in publishers {
        let (tx, mut rx) = mpsc::unbounded_channel::<PendingConfirm>();
        senders.push(tx);
        checkers.push(tokio::spawn(async move {
            while let Some(confirm) = rx.recv().await {
                confirm
                    .await
                    .context("a published event was not confirmed")?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let publish_one = |seq: u64| {
        let index = usize::try_from(seq).unwrap_or(0) % publishers.len();
        let publisher = &publishers[index];
        let sender = &senders[index];
        let clock = clock.clone();
        async move {
            let ev = factory.encode(seq, now_ms());
            // As every adapter does: the router takes the validated user as the source.
            let props = MessageProps::new()
                .message_id(ev.event_id.as_str())
                .header(event::HEADER_KEY, ev.record.as_str())
                .user_id(user_id)
                .timestamp_now();
            if let Some(clock) = &clock {
                clock.mark(seq, Instant::now());
            }
            let confirm = publisher
                .publish(exchange, event::ROUTING_KEY, &ev.body, props)
                .await?;
            sender
                .send(confirm)
                .map_err(|_| anyhow::anyhow!("a confirm checker stopped early"))
        }
    };
    let sent: anyhow::Result<()> = match pace {
        Pace::Flat => {
            // One task per publisher keeps every window full.
            let lanes = publishers.len() as u64;
            let lane_futures = (0..lanes).map(|lane| {
                let publish_one = &publish_one;
                async move {
                    let mut seq = lane;
                    while seq < n {
                        publish_one(seq).await?;
                        seq += lanes;
                    }
                    Ok::<_, anyhow::Error>(())
                }
            });
            futures::future::try_join_all(lane_futures).await.map(drop)
        }
        Pace::Rate(rate) => {
            let rate = rate.max(1.0);
            let start = tokio::time::Instant::now();
            let mut seq = 0;
            let mut result = Ok(());
            while seq < n && result.is_ok() {
                let elapsed = start.elapsed().as_secs_f64();
                let due = ((elapsed * rate) as u64 + 1).min(n);
                while seq < due {
                    if let Err(e) = publish_one(seq).await {
                        result = Err(e);
                        break;
                    }
                    seq += 1;
                }
                if seq < n {
                    let next = start + Duration::from_secs_f64(seq as f64 / rate);
                    tokio::time::sleep_until(next).await;
                }
            }
            result
        }
    };
    drop(senders);
    for checker in checkers {
        checker.await.context("a confirm checker panicked")??;
    }
    sent
}

/// What one subscriber saw.
#[derive(Debug)]
pub struct SinkReport {
    /// When the last expected message arrived.
    pub last_at: Instant,
    /// Per delivery, microseconds from publish to receipt (latency mode only).
    pub latencies_us: Vec<u32>,
}

/// Starts one consumer per inbox; each finishes once it received `expect` messages. With a
/// clock, the latency of each delivery (found by its message id) is recorded.
pub async fn spawn_sinks(
    conn: &Connection,
    inboxes: &[String],
    expect: u64,
    prefetch: u16,
    ack_batch: usize,
    clock: Option<Arc<SendClock>>,
) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<SinkReport>>>> {
    let mut sinks = Vec::with_capacity(inboxes.len());
    for inbox in inboxes {
        let channel = conn.open_channel().await?;
        let tag = format!("concord-bench-sink/{inbox}");
        let mut consumer = consume(&channel, inbox, &tag, prefetch).await?;
        let clock = clock.clone();
        let inbox = inbox.clone();
        sinks.push(tokio::spawn(async move {
            let mut batcher = AckBatcher::new(ack_batch);
            let mut received = 0u64;
            let mut last_at = Instant::now();
            let capacity = if clock.is_some() { expect } else { 0 };
            let mut latencies_us = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
            while received < expect {
                let next = match consumer.next().now_or_never() {
                    Some(next) => next,
                    None => {
                        // Nothing ready: settle what we have, then wait.
                        batcher.flush().await?;
                        tokio::time::timeout(IDLE_TIMEOUT, consumer.next())
                            .await
                            .map_err(|_| {
                                anyhow::anyhow!(
                                    "{inbox}: nothing received for {IDLE_TIMEOUT:?} \
                                     ({received} of {expect})"
                                )
                            })?
                    }
                };
                let delivery = match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(e).context(format!("consuming {inbox}")),
                    None => bail!("{inbox}: the consumer ended ({received} of {expect})"),
                };
                let at = Instant::now();
                received += 1;
                last_at = at;
                if let Some(clock) = &clock {
                    // The event id travels as the message id (the router and the forwarder
                    // both set it): no need to decode the body.
                    let id = delivery
                        .message_id()
                        .with_context(|| format!("{inbox}: a delivery without message_id"))?;
                    let latency = event::seq_of(id)
                        .and_then(|seq| clock.latency_us(seq, at))
                        .with_context(|| format!("{inbox}: event {id} was never sent"))?;
                    latencies_us.push(latency);
                }
                batcher.ack(&delivery).await?;
            }
            batcher.flush().await?;
            let _ = consumer.cancel().await;
            let _ = channel.close().await;
            Ok(SinkReport {
                last_at,
                latencies_us,
            })
        }));
    }
    Ok(sinks)
}

/// Waits for every sink.
pub async fn join_sinks(
    sinks: Vec<JoinHandle<anyhow::Result<SinkReport>>>,
) -> anyhow::Result<Vec<SinkReport>> {
    let mut reports = Vec::with_capacity(sinks.len());
    for sink in sinks {
        reports.push(sink.await.context("a subscriber panicked")??);
    }
    Ok(reports)
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub samples: usize,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples_us`.
    pub fn of(mut samples_us: Vec<u32>) -> Self {
        samples_us.sort_unstable();
        let rank = |p: f64| -> f64 {
            if samples_us.is_empty() {
                return 0.0;
            }
            let i = ((p * samples_us.len() as f64).ceil() as usize).clamp(1, samples_us.len());
            f64::from(samples_us[i - 1]) / 1000.0
        };
        Self {
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: rank(1.0),
            samples: samples_us.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=1000).map(|i| i * 1000).collect());
        assert_eq!(p.p50_ms, 500.0);
        assert_eq!(p.p99_ms, 990.0);
        assert_eq!(p.max_ms, 1000.0);
        assert_eq!(p.samples, 1000);
        let one = Percentiles::of(vec![1500]);
        assert_eq!((one.p50_ms, one.p99_ms, one.max_ms), (1.5, 1.5, 1.5));
        assert_eq!(Percentiles::of(Vec::new()).samples, 0);
    }

    #[test]
    fn send_clock_measures_from_the_mark() {
        let clock = SendClock::new(2);
        let sent = Instant::now();
        clock.mark(1, sent);
        assert_eq!(clock.latency_us(0, sent), None);
        let latency = clock
            .latency_us(1, sent + Duration::from_micros(2500))
            .unwrap();
        assert!((2499..=2501).contains(&latency), "{latency}");
        assert_eq!(clock.latency_us(7, sent), None);
    }
}
