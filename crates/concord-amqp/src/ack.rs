//! Cumulative (`multiple = true`) acknowledgements.
//!
//! # Contract
//!
//! An ack with `multiple = true` settles *every* unacknowledged delivery of the channel
//! up to its tag. An [`AckBatcher`] must therefore be fed, in increasing delivery-tag
//! order, only deliveries whose predecessors on that channel are all settled (fed to the
//! batcher, or nacked/rejected through it). A consumer that processes deliveries
//! concurrently must re-order completions before feeding them (e.g. track the lowest
//! unfinished tag). Use one batcher per consumer channel, and a new one after a
//! reconnect. Never also ack a fed delivery through its own [`crate::Acker`].
//!
//! Acks are sent every `batch_size` deliveries; callers must also [`AckBatcher::flush`]
//! when idle (e.g. when the consumer stream has nothing ready, or on a short timer),
//! otherwise up to `batch_size - 1` deliveries stay unacknowledged — and with
//! `batch_size >= prefetch` the broker stops delivering altogether.
//!
//! # After a connection or channel loss
//!
//! lapin poisons the ackers of a dead channel: acking returns `Ok(false)` (or an error
//! if the channel dies during the ack). Nothing is acked then, and the broker redelivers
//! those messages (with `redelivered = true`) to the next consumer. The batcher logs
//! this, counts it in [`AckBatcher::stale`], and never panics.
//!
//! With lapin 4.12.3 an ack that is in flight when the connection resets sometimes never
//! resolves. Every ack, nack and reject is therefore bounded by [`ACK_TIMEOUT`]: past it the
//! batcher returns [`AmqpError::Timeout`], which callers treat like a lost connection
//! (reconnect; the broker redelivers whatever was not acknowledged).

use std::fmt;

use lapin::{
    Acker,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
};
use tracing::warn;

use crate::{consumer::Delivery, error::AmqpError};

/// Default number of deliveries per cumulative ack (≈10% of a prefetch of 500).
pub const DEFAULT_ACK_BATCH: usize = 50;

/// Longest wait for lapin to hand an ack, nack or reject to the connection. Sending one
/// takes microseconds on a live connection; no broker reply is awaited.
pub const ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Bounds one ack/nack/reject by [`ACK_TIMEOUT`].
async fn bounded(
    send: impl std::future::Future<Output = lapin::Result<bool>>,
) -> Result<lapin::Result<bool>, AmqpError> {
    tokio::time::timeout(ACK_TIMEOUT, send)
        .await
        .map_err(|_| AmqpError::Timeout(ACK_TIMEOUT))
}

/// What an [`AckBatcher`] needs to settle one delivery: its tag and lapin's acker.
#[derive(Clone)]
pub struct AckHandle {
    delivery_tag: u64,
    acker: Acker,
}

impl fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckHandle")
            .field("delivery_tag", &self.delivery_tag)
            .field("usable", &self.acker.usable())
            .finish()
    }
}

impl AckHandle {
    pub(crate) fn new(delivery_tag: u64, acker: Acker) -> Self {
        Self {
            delivery_tag,
            acker,
        }
    }

    /// The delivery tag.
    #[must_use]
    pub fn delivery_tag(&self) -> u64 {
        self.delivery_tag
    }
}

impl From<&Delivery> for AckHandle {
    fn from(delivery: &Delivery) -> Self {
        delivery.ack_handle()
    }
}

/// Acknowledges deliveries cumulatively (see the module docs for the contract).
#[derive(Debug)]
pub struct AckBatcher {
    batch_size: usize,
    /// Highest fed and not yet acknowledged delivery.
    pending: Option<AckHandle>,
    pending_count: usize,
    last_tag: u64,
    stale: u64,
}

impl Default for AckBatcher {
    fn default() -> Self {
        Self::new(DEFAULT_ACK_BATCH)
    }
}

impl AckBatcher {
    /// Ack every `batch_size` deliveries (at least 1).
    #[must_use]
    pub fn new(batch_size: usize) -> Self {
        Self {
            batch_size: batch_size.max(1),
            pending: None,
            pending_count: 0,
            last_tag: 0,
            stale: 0,
        }
    }

    /// Batch size of about 10% of `prefetch` (at least 1).
    #[must_use]
    pub fn for_prefetch(prefetch: u16) -> Self {
        Self::new(usize::from(prefetch / 10))
    }

    /// The batch size.
    #[must_use]
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Number of fed deliveries not acknowledged yet.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.pending_count
    }

    /// Number of deliveries whose ack could not be sent because their channel was gone
    /// (the broker redelivers them).
    #[must_use]
    pub fn stale(&self) -> u64 {
        self.stale
    }

    fn check_order(&mut self, handle: &AckHandle) -> Result<(), AmqpError> {
        if handle.delivery_tag <= self.last_tag {
            return Err(AmqpError::AckOutOfOrder {
                tag: handle.delivery_tag,
                last: self.last_tag,
            });
        }
        self.last_tag = handle.delivery_tag;
        Ok(())
    }

    /// Mark a delivery as done; sends a cumulative ack once `batch_size` are pending.
    /// Tags must increase and every predecessor must be settled (see module docs).
    pub async fn ack(&mut self, handle: impl Into<AckHandle>) -> Result<(), AmqpError> {
        let handle = handle.into();
        self.check_order(&handle)?;
        self.pending = Some(handle);
        self.pending_count += 1;
        if self.pending_count >= self.batch_size {
            self.flush().await
        } else {
            Ok(())
        }
    }

    /// Acknowledge everything fed so far with one `multiple = true` ack.
    ///
    /// A stale ack (channel gone) is logged and counted, not an error; an error means
    /// the channel failed during the ack. Either way the broker redelivers.
    pub async fn flush(&mut self) -> Result<(), AmqpError> {
        let Some(handle) = self.pending.take() else {
            return Ok(());
        };
        let count = std::mem::take(&mut self.pending_count);
        let result = bounded(handle.acker.ack(BasicAckOptions { multiple: true })).await;
        self.settled(result, "ack", handle.delivery_tag, count)
    }

    /// Negatively acknowledge one delivery (after flushing the acks fed before it).
    /// `requeue = false` dead-letters it to its DLQ.
    pub async fn nack(
        &mut self,
        handle: impl Into<AckHandle>,
        requeue: bool,
    ) -> Result<(), AmqpError> {
        let handle = handle.into();
        self.check_order(&handle)?;
        self.flush().await?;
        let result = bounded(handle.acker.nack(BasicNackOptions {
            multiple: false,
            requeue,
        }))
        .await;
        self.settled(result, "nack", handle.delivery_tag, 1)
    }

    /// Reject one delivery (after flushing the acks fed before it). `requeue = false`
    /// dead-letters it to its DLQ.
    pub async fn reject(
        &mut self,
        handle: impl Into<AckHandle>,
        requeue: bool,
    ) -> Result<(), AmqpError> {
        let handle = handle.into();
        self.check_order(&handle)?;
        self.flush().await?;
        let result = bounded(handle.acker.reject(BasicRejectOptions { requeue })).await;
        self.settled(result, "reject", handle.delivery_tag, 1)
    }

    fn settled(
        &mut self,
        result: Result<lapin::Result<bool>, AmqpError>,
        what: &'static str,
        delivery_tag: u64,
        count: usize,
    ) -> Result<(), AmqpError> {
        let result = match result {
            Ok(r) => r,
            Err(timeout) => {
                self.stale += count as u64;
                warn!(
                    delivery_tag,
                    count,
                    "{what} not sent within {ACK_TIMEOUT:?}: treating the connection as lost"
                );
                return Err(timeout);
            }
        };
        match result {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.stale += count as u64;
                warn!(
                    delivery_tag,
                    count, "stale {what}: channel gone, the broker will redeliver"
                );
                Ok(())
            }
            Err(e) => {
                self.stale += count as u64;
                warn!(delivery_tag, count, error = %e, "{what} failed, the broker will redeliver");
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(tag: u64) -> AckHandle {
        let delivery = lapin::message::Delivery::mock(tag, "".into(), "".into(), false, vec![]);
        AckHandle::new(tag, delivery.acker)
    }

    #[tokio::test]
    async fn batches_and_flushes() {
        let mut batcher = AckBatcher::new(3);
        batcher.ack(handle(1)).await.unwrap();
        batcher.ack(handle(2)).await.unwrap();
        assert_eq!(batcher.pending(), 2);
        batcher.ack(handle(3)).await.unwrap();
        assert_eq!(batcher.pending(), 0);
        batcher.ack(handle(4)).await.unwrap();
        batcher.flush().await.unwrap();
        assert_eq!(batcher.pending(), 0);
        batcher.flush().await.unwrap();
        assert_eq!(batcher.stale(), 0);
    }

    #[tokio::test]
    async fn rejects_out_of_order_tags() {
        let mut batcher = AckBatcher::new(10);
        batcher.ack(handle(5)).await.unwrap();
        assert!(matches!(
            batcher.ack(handle(5)).await,
            Err(AmqpError::AckOutOfOrder { tag: 5, last: 5 })
        ));
        assert!(matches!(
            batcher.nack(handle(2), false).await,
            Err(AmqpError::AckOutOfOrder { tag: 2, last: 5 })
        ));
        assert_eq!(batcher.pending(), 1);
    }

    #[tokio::test]
    async fn nack_flushes_first() {
        let mut batcher = AckBatcher::new(10);
        batcher.ack(handle(1)).await.unwrap();
        batcher.ack(handle(2)).await.unwrap();
        batcher.nack(handle(3), true).await.unwrap();
        assert_eq!(batcher.pending(), 0);
    }

    #[test]
    fn batch_size_for_prefetch() {
        assert_eq!(AckBatcher::for_prefetch(500).batch_size(), 50);
        assert_eq!(AckBatcher::for_prefetch(5).batch_size(), 1);
        assert_eq!(AckBatcher::default().batch_size(), DEFAULT_ACK_BATCH);
    }
}
