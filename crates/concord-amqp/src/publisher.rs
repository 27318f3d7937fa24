//! Confirmed, pipelined publishing.
//!
//! # How confirms are tracked
//!
//! [`Publisher::publish`] sends at once and hands back a [`PendingConfirm`]; a background
//! task (the *tracker*) owns lapin's confirm futures and resolves the `PendingConfirm`s.
//! At most `window` messages are unconfirmed at any time, so callers can pipeline freely.
//!
//! RabbitMQ acks unroutable `mandatory` messages after returning them (`basic.return`).
//! lapin 4.12 hands each returned message to *whichever* confirm it resolves next on the
//! channel (a FIFO popped while iterating a `HashMap` of pending tags), so with pipelined
//! publishing a returned message is regularly attached to the confirm of another message
//! — and the returned one looks delivered. To stay exact, every message carries
//! [`CONFIRM_SEQ_HEADER`]; returned messages are correlated by that header, never by the
//! confirm that happens to carry them. A confirm is only finalized once every return
//! that could belong to it is in hand: RabbitMQ sends a message's `basic.return` before
//! its ack, and lapin processes all incoming frames of a connection in order, so after a
//! round trip on the same connection every return that precedes an already-observed ack
//! has been seen. That round trip (a no-op `basic.qos`) runs on a second, otherwise idle
//! channel so that it is neither queued behind our publishes in lapin's outgoing buffer
//! nor behind their processing in the broker's channel process; it is skipped entirely
//! when no other publish is in flight.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
    time::{SystemTime, UNIX_EPOCH},
};

use futures::{StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Confirmation, PublisherConfirm,
    message::BasicReturnMessage,
    options::{BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::{debug, error, warn};

use crate::{
    Connection,
    channel::Channel,
    error::{AmqpError, PublishError, short},
};

/// Content type of every Concord message.
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// Header stamped on every published message (an `i64` sequence number, unique per
/// [`Publisher`]) to correlate returned messages. Internal: consumers must ignore it.
pub const CONFIRM_SEQ_HEADER: &str = "x-concord-publish-seq";

/// Default maximum number of unconfirmed messages per publisher.
pub const DEFAULT_WINDOW: usize = 512;

/// Persistent delivery mode.
const PERSISTENT: u8 = 2;

/// Options of a [`Publisher`].
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    /// Maximum number of published but not yet confirmed messages; `publish` waits for
    /// room beyond that. Default 512.
    pub window: usize,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
        }
    }
}

/// Properties of a message to publish. `content_type` is always [`CONTENT_TYPE`] and the
/// delivery mode always persistent.
///
/// Beware: RabbitMQ rejects (with a channel error) a `user_id` that differs from the
/// user the publishing connection authenticated as.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageProps {
    headers: Vec<(String, String)>,
    user_id: Option<String>,
    message_id: Option<String>,
    timestamp: Option<u64>,
}

impl MessageProps {
    /// No headers, no ids.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Set a string header (e.g. `concord-origin`); a later value for the same name wins.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        let value = value.into();
        match self.headers.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.headers.push((name, value)),
        }
        self
    }

    /// Set the `user_id` property (must equal the connection's user, see type docs).
    #[must_use]
    pub fn user_id(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }

    /// Set the `message_id` property.
    #[must_use]
    pub fn message_id(mut self, message_id: impl Into<String>) -> Self {
        self.message_id = Some(message_id.into());
        self
    }

    /// Set the `timestamp` property (seconds since the Unix epoch).
    #[must_use]
    pub fn timestamp(mut self, unix_seconds: u64) -> Self {
        self.timestamp = Some(unix_seconds);
        self
    }

    /// Set the `timestamp` property to now.
    #[must_use]
    pub fn timestamp_now(self) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.timestamp(now)
    }

    /// Value of a header set with [`MessageProps::header`].
    #[must_use]
    pub fn get_header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The string headers as an AMQP table.
    pub(crate) fn headers_table(&self) -> Result<FieldTable, AmqpError> {
        let mut table = FieldTable::default();
        for (name, value) in &self.headers {
            table.insert(
                short(name)?,
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        Ok(table)
    }

    /// The lapin properties of this message, `seq` stamped in [`CONFIRM_SEQ_HEADER`].
    fn to_basic_properties(&self, seq: u64) -> Result<BasicProperties, AmqpError> {
        let mut headers = self.headers_table()?;
        headers.insert(
            CONFIRM_SEQ_HEADER.into(),
            AMQPValue::LongLongInt(i64::try_from(seq).unwrap_or(i64::MAX)),
        );
        let mut props = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers);
        if let Some(user_id) = &self.user_id {
            props = props.with_user_id(short(user_id)?);
        }
        if let Some(message_id) = &self.message_id {
            props = props.with_message_id(short(message_id)?);
        }
        if let Some(timestamp) = self.timestamp {
            props = props.with_timestamp(timestamp);
        }
        Ok(props)
    }
}

/// The eventual outcome of one publish: `Ok(())` once the broker confirmed it AND it
/// was not returned as unroutable. Dropping it does not cancel anything.
#[must_use = "a publish is only known to be delivered once its PendingConfirm resolves"]
#[derive(Debug)]
pub struct PendingConfirm {
    rx: oneshot::Receiver<Result<(), PublishError>>,
}

impl Future for PendingConfirm {
    type Output = Result<(), PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|received| {
            received.unwrap_or(Err(PublishError::Connection(AmqpError::PublisherClosed)))
        })
    }
}

/// A confirm-mode channel with a bounded window of in-flight messages. Cheap to clone;
/// clones share the channel and the window. Dropping every clone lets the in-flight
/// confirms finish, then closes the channel.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    shared: Arc<Shared>,
}

struct Shared {
    window: usize,
    permits: Arc<Semaphore>,
    /// Serializes "register the confirm + queue the frames" (see `publish`) and numbers
    /// messages.
    sequencer: Mutex<Sequencer>,
}

struct Sequencer {
    next_seq: u64,
    tracker: mpsc::UnboundedSender<Tracked>,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("channel", &self.channel.id())
            .field("window", &self.shared.window)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

type SendFuture = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

impl Publisher {
    /// Open a confirm-mode channel (plus a small control channel used to order confirm
    /// bookkeeping, see the module docs) on `connection`. Use that connection for
    /// publishing only: one publishing connection per process.
    pub async fn open(
        connection: &Connection,
        options: PublisherOptions,
    ) -> Result<Self, AmqpError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| AmqpError::NoRuntime)?;
        let channel = connection.open_channel().await?;
        let control = connection.open_channel().await?;
        channel
            .lapin()
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let window = options.window.clamp(1, Semaphore::MAX_PERMITS);
        let permits = Arc::new(Semaphore::new(window));
        let (tx, rx) = mpsc::unbounded_channel();
        let tracker = Tracker {
            channel: channel.lapin().clone(),
            control: control.lapin().clone(),
            permits: permits.clone(),
            window,
            submissions: rx,
            in_flight: FuturesUnordered::new(),
            returns: HashMap::new(),
        };
        runtime.spawn(tracker.run());
        Ok(Self {
            channel,
            shared: Arc::new(Shared {
                window,
                permits,
                sequencer: Mutex::new(Sequencer {
                    next_seq: 1,
                    tracker: tx,
                }),
            }),
        })
    }

    /// Publish `payload` to `exchange` with `routing_key` (`mandatory`, persistent,
    /// [`CONTENT_TYPE`]). The message is handed to the connection before this returns;
    /// the returned [`PendingConfirm`] resolves when the broker has confirmed it.
    ///
    /// Waits only when `window` messages are already unconfirmed. Errors mean the
    /// channel is unusable (closed, connection lost) or the names/properties are invalid.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: MessageProps,
    ) -> Result<PendingConfirm, AmqpError> {
        let exchange = short(exchange)?;
        let routing_key = short(routing_key)?;
        let permit = self
            .shared
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AmqpError::PublisherClosed)?;
        let payload = payload.to_vec();
        let (tx, rx) = oneshot::channel();

        let mut sequencer = self
            .shared
            .sequencer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let seq = sequencer.next_seq;
        let properties = props.to_basic_properties(seq)?;
        let channel = self.channel.lapin().clone();
        let mut send: SendFuture = Box::pin(async move {
            let options = BasicPublishOptions {
                mandatory: true,
                immediate: false,
            };
            channel
                .basic_publish(exchange, routing_key, options, &payload, properties)
                .await
        });
        // lapin numbers the confirm and queues the frames in two separate critical
        // sections of `basic_publish`'s first poll: two tasks publishing concurrently on
        // one channel could put frames on the wire in another order than the numbers,
        // and confirms would then resolve the wrong futures. Running that first poll
        // under our lock keeps numbering and wire order identical. (The noop waker is
        // replaced by the tracker's when it polls the future again.)
        let first_poll = send.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        let stage = match first_poll {
            Poll::Ready(Err(e)) => return Err(e.into()),
            Poll::Ready(Ok(confirm)) => Stage::Confirming(confirm),
            Poll::Pending => Stage::Sending(send),
        };
        sequencer.next_seq += 1;
        let tracked = Tracked {
            seq,
            stage,
            waiter: Some(Waiter { tx, permit }),
        };
        if sequencer.tracker.send(tracked).is_err() {
            return Err(AmqpError::PublisherClosed);
        }
        drop(sequencer);
        Ok(PendingConfirm { rx })
    }

    /// Publish and wait for the outcome (convenience for non-pipelined callers).
    pub async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: MessageProps,
    ) -> Result<(), PublishError> {
        self.publish(exchange, routing_key, payload, props)
            .await
            .map_err(PublishError::Connection)?
            .await
    }

    /// Number of published messages whose confirm is not resolved yet.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.shared.window - self.shared.permits.available_permits()
    }

    /// The configured window.
    #[must_use]
    pub fn window(&self) -> usize {
        self.shared.window
    }

    /// Wait until every message published so far has its outcome resolved.
    pub async fn wait_idle(&self) -> Result<(), AmqpError> {
        let all = u32::try_from(self.shared.window).unwrap_or(u32::MAX);
        let permits = self
            .shared
            .permits
            .acquire_many(all)
            .await
            .map_err(|_| AmqpError::PublisherClosed)?;
        drop(permits);
        Ok(())
    }

    /// Whether the underlying channel is still open.
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.channel.is_connected()
    }

    /// The confirm-mode channel (do not publish on it directly).
    #[must_use]
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Wait for in-flight confirms, then close the channel. A channel already closed (its
    /// connection lost) is left as it is: no confirm can come on it any more.
    pub async fn close(self) -> Result<(), AmqpError> {
        if !self.channel.is_connected() {
            return Ok(());
        }
        self.wait_idle().await?;
        if self.channel.is_connected() {
            self.channel.close().await?;
        }
        Ok(())
    }
}

/// Where a tracked publish resolves to.
struct Waiter {
    tx: oneshot::Sender<Result<(), PublishError>>,
    /// Window slot, released when the outcome is finalized.
    permit: OwnedSemaphorePermit,
}

enum Stage {
    /// Frames queued, not written yet.
    Sending(SendFuture),
    /// Written, waiting for the broker's confirm.
    Confirming(PublisherConfirm),
}

/// One publish as followed by the tracker.
struct Tracked {
    seq: u64,
    stage: Stage,
    waiter: Option<Waiter>,
}

/// What lapin said about a publish (the return, if any, is correlated separately).
enum Outcome {
    Ack,
    Nack,
    Failed(lapin::Error),
}

struct Observed {
    seq: u64,
    outcome: Outcome,
    waiter: Option<Waiter>,
}

impl Future for Tracked {
    type Output = (u64, lapin::Result<Confirmation>, Option<Waiter>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            let result = match &mut this.stage {
                Stage::Sending(send) => match send.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(confirm)) => {
                        this.stage = Stage::Confirming(confirm);
                        continue;
                    }
                    Poll::Ready(Err(e)) => Err(e),
                },
                Stage::Confirming(confirm) => match Pin::new(confirm).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(result) => result,
                },
            };
            return Poll::Ready((this.seq, result, this.waiter.take()));
        }
    }
}

/// Background task resolving `PendingConfirm`s (see the module docs).
struct Tracker {
    channel: lapin::Channel,
    /// Idle channel of the same connection for the ordering round trip.
    control: lapin::Channel,
    permits: Arc<Semaphore>,
    window: usize,
    submissions: mpsc::UnboundedReceiver<Tracked>,
    in_flight: FuturesUnordered<Tracked>,
    /// Returned messages by publish sequence number: `(reply_code, reply_text)`.
    returns: HashMap<u64, (u16, String)>,
}

impl Tracker {
    async fn run(mut self) {
        let mut open = true;
        let mut observed: Vec<Observed> = Vec::new();
        loop {
            while open {
                match self.submissions.try_recv() {
                    Ok(tracked) => self.in_flight.push(tracked),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            if observed.is_empty() {
                if !open && self.in_flight.is_empty() {
                    break;
                }
                tokio::select! {
                    Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                        self.observe(done, &mut observed);
                    }
                    submission = self.submissions.recv(), if open => match submission {
                        Some(tracked) => self.in_flight.push(tracked),
                        None => open = false,
                    },
                    else => break,
                }
                continue;
            }
            // Everything already resolved joins this round.
            self.drain_ready(&mut observed);
            // Publishes other than the observed ones hold window permits: if there are
            // none, every confirm (and so every return) is already in hand.
            let others_in_flight = self.permits.available_permits() + observed.len() < self.window;
            let mut late = Vec::new();
            if others_in_flight {
                Self::barrier(&self.control, &self.channel).await;
                self.drain_ready(&mut late);
            }
            for done in observed.drain(..) {
                self.finalize(done);
            }
            observed = late;
            if self.in_flight.is_empty() && observed.is_empty() && !self.returns.is_empty() {
                warn!(
                    count = self.returns.len(),
                    "returned messages matched no in-flight publish"
                );
                self.returns.clear();
            }
        }
        debug!(channel = self.channel.id(), "publisher tracker stopped");
    }

    /// Round trip on the connection: once it completes, lapin has fully processed every
    /// frame received before the reply — in particular each observed ack and the
    /// returns preceding it. Falls back to the publishing channel if the control channel
    /// is gone; if both fail the connection is closed, which lapin also processes in
    /// frame order (pending confirms are then failed, none is left to mis-attribute).
    async fn barrier(control: &lapin::Channel, publishing: &lapin::Channel) {
        for channel in [control, publishing] {
            match channel.basic_qos(0, BasicQosOptions::default()).await {
                Ok(()) => return,
                Err(e) => debug!(channel = channel.id(), error = %e, "confirm barrier failed"),
            }
        }
    }

    /// Collect every tracked publish whose result is available now. Exhaustive: it only
    /// stops once the set has no woken member left.
    fn drain_ready(&mut self, out: &mut Vec<Observed>) {
        let flag = Arc::new(WakeFlag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        loop {
            flag.0.store(false, Ordering::SeqCst);
            match self.in_flight.poll_next_unpin(&mut cx) {
                Poll::Ready(Some(done)) => self.observe(done, out),
                Poll::Ready(None) => break,
                // `FuturesUnordered` returns Pending after waking itself when it yields
                // cooperatively; only a Pending without wake-up means "nothing ready".
                Poll::Pending if flag.0.load(Ordering::SeqCst) => {}
                Poll::Pending => break,
            }
        }
    }

    fn observe(
        &mut self,
        (seq, result, waiter): (u64, lapin::Result<Confirmation>, Option<Waiter>),
        out: &mut Vec<Observed>,
    ) {
        let outcome = match result {
            Ok(Confirmation::Ack(returned)) => {
                self.record_return(seq, returned);
                Outcome::Ack
            }
            Ok(Confirmation::Nack(returned)) => {
                self.record_return(seq, returned);
                Outcome::Nack
            }
            // Impossible in confirm mode; never count it as delivered.
            Ok(Confirmation::NotRequested) => Outcome::Nack,
            Err(e) => Outcome::Failed(e),
        };
        out.push(Observed {
            seq,
            outcome,
            waiter,
        });
    }

    fn record_return(&mut self, carrier: u64, returned: Option<BasicReturnMessage>) {
        let Some(message) = returned else { return };
        let seq = message
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| headers.inner().get(CONFIRM_SEQ_HEADER))
            .and_then(|value| match value {
                AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
                _ => None,
            });
        let seq = seq.unwrap_or_else(|| {
            error!(
                carrier,
                "returned message without {CONFIRM_SEQ_HEADER}; attributing it to its carrier"
            );
            carrier
        });
        debug!(
            seq,
            carrier,
            reply_code = message.reply_code,
            reply_text = %message.reply_text,
            exchange = %message.delivery.exchange,
            routing_key = %message.delivery.routing_key,
            "message returned by the broker"
        );
        self.returns.insert(
            seq,
            (message.reply_code, message.reply_text.as_str().to_owned()),
        );
    }

    fn finalize(&mut self, done: Observed) {
        let result = match (self.returns.remove(&done.seq), done.outcome) {
            (Some((reply_code, reply_text)), _) => Err(PublishError::Returned {
                reply_code,
                reply_text,
            }),
            (None, Outcome::Ack) => Ok(()),
            (None, Outcome::Nack) => Err(PublishError::Nacked),
            (None, Outcome::Failed(e)) => Err(PublishError::Connection(e.into())),
        };
        if let Some(waiter) = done.waiter {
            // The caller may have dropped its PendingConfirm: fire and forget is fine.
            let _ = waiter.tx.send(result);
            drop(waiter.permit);
        }
    }
}

struct WakeFlag(AtomicBool);

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_props_build_basic_properties() {
        let props = MessageProps::new()
            .header("concord-origin", "crm")
            .header("concord-key", "k1")
            .header("concord-origin", "erp")
            .user_id("guest")
            .message_id("m-1")
            .timestamp(1_700_000_000);
        assert_eq!(props.get_header("concord-origin"), Some("erp"));
        let basic = props.to_basic_properties(42).unwrap();
        assert_eq!(
            basic.content_type().as_ref().unwrap().as_str(),
            CONTENT_TYPE
        );
        assert_eq!(*basic.delivery_mode(), Some(2));
        assert_eq!(basic.user_id().as_ref().unwrap().as_str(), "guest");
        assert_eq!(basic.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(*basic.timestamp(), Some(1_700_000_000));
        let headers = basic.headers().as_ref().unwrap().inner();
        assert_eq!(
            headers.get("concord-origin"),
            Some(&AMQPValue::LongString("erp".into()))
        );
        assert_eq!(
            headers.get(CONFIRM_SEQ_HEADER),
            Some(&AMQPValue::LongLongInt(42))
        );
        assert_eq!(headers.len(), 3);
    }

    #[test]
    fn invalid_header_name_is_an_error_not_a_panic() {
        let props = MessageProps::new().header("h".repeat(300), "v");
        assert!(matches!(
            props.to_basic_properties(1),
            Err(AmqpError::InvalidName { .. })
        ));
    }
}
