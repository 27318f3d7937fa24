//! Consuming with bounded prefetch and manual acknowledgements.

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll},
};

use futures::Stream;
use lapin::{
    Acker, BasicProperties,
    options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
};
use tracing::warn;

use crate::{
    ack::AckHandle,
    channel::Channel,
    error::{AmqpError, short},
};

/// Start consuming `queue` on `channel` with manual acks and at most `prefetch`
/// unacknowledged deliveries (`basic.qos`, per consumer). Use one channel per consumer.
///
/// The returned stream yields `Err` and then ends when the channel or the connection
/// fails or is closed, or when the broker cancels the consumer (e.g. queue deleted):
/// for a supervisor, any `Err` means "reconnect".
pub async fn consume(
    channel: &Channel,
    queue: &str,
    consumer_tag: &str,
    prefetch: u16,
) -> Result<Consumer, AmqpError> {
    channel
        .lapin()
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let inner = channel
        .lapin()
        .basic_consume(
            short(queue)?,
            short(consumer_tag)?,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(Consumer {
        inner,
        channel: channel.clone(),
        queue: queue.to_owned(),
        consumer_tag: consumer_tag.to_owned(),
        cancelled_by_us: false,
        errored: false,
        finished: false,
    })
}

/// A stream of [`Delivery`]s (see [`consume`]).
pub struct Consumer {
    inner: lapin::Consumer,
    channel: Channel,
    queue: String,
    consumer_tag: String,
    cancelled_by_us: bool,
    errored: bool,
    finished: bool,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.queue)
            .field("consumer_tag", &self.consumer_tag)
            .field("channel", &self.channel.id())
            .finish()
    }
}

impl Consumer {
    /// The channel the consumer lives on.
    #[must_use]
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The consumed queue.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The consumer tag.
    #[must_use]
    pub fn consumer_tag(&self) -> &str {
        &self.consumer_tag
    }

    /// Cancel the consumer; the stream then ends without error. Deliveries already
    /// received may still be acked on this channel.
    pub async fn cancel(&mut self) -> Result<(), AmqpError> {
        self.cancelled_by_us = true;
        self.channel
            .lapin()
            .basic_cancel(short(&self.consumer_tag)?, BasicCancelOptions::default())
            .await?;
        Ok(())
    }
}

impl Stream for Consumer {
    type Item = Result<Delivery, AmqpError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(delivery))) => Poll::Ready(Some(Ok(Delivery::new(delivery)))),
            Poll::Ready(Some(Err(e))) => {
                this.errored = true;
                warn!(queue = %this.queue, error = %e, "consumer failed");
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finished = true;
                if this.cancelled_by_us || this.errored {
                    Poll::Ready(None)
                } else {
                    // lapin ends the stream silently on a graceful channel/connection close
                    // or a broker-side cancel: make that visible to supervisors.
                    warn!(queue = %this.queue, "consumer cancelled by channel/connection close or broker");
                    Poll::Ready(Some(Err(AmqpError::ConsumerCancelled {
                        queue: this.queue.clone(),
                        consumer_tag: this.consumer_tag.clone(),
                    })))
                }
            }
        }
    }
}

/// A received message. The body is opaque bytes; headers are carried, not interpreted.
///
/// Settle it exactly once, either through an [`crate::AckBatcher`] (preferred) or with
/// [`Delivery::ack`] — never both: a cumulative (`multiple`) ack also covers this delivery,
/// and acking it again makes the broker close the channel.
#[derive(Debug)]
pub struct Delivery {
    /// Message body.
    pub body: Vec<u8>,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Exchange it was published to.
    pub exchange: String,
    /// Whether the broker delivered it before (to this or another consumer).
    pub redelivered: bool,
    /// Channel-scoped delivery tag.
    pub delivery_tag: u64,
    properties: Properties,
    acker: Acker,
}

impl Delivery {
    fn new(d: lapin::message::Delivery) -> Self {
        Self {
            body: d.data,
            routing_key: d.routing_key.into(),
            exchange: d.exchange.into(),
            redelivered: d.redelivered,
            delivery_tag: d.delivery_tag,
            properties: Properties(d.properties),
            acker: d.acker,
        }
    }

    /// A header's value if it is a string (long or short string, valid UTF-8).
    #[must_use]
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.properties.header_str(name)
    }

    /// The `user_id` property (validated by RabbitMQ against the publisher's login).
    #[must_use]
    pub fn user_id(&self) -> Option<&str> {
        self.properties.user_id()
    }

    /// The `message_id` property.
    #[must_use]
    pub fn message_id(&self) -> Option<&str> {
        self.properties.message_id()
    }

    /// The `timestamp` property (seconds since the Unix epoch).
    #[must_use]
    pub fn timestamp(&self) -> Option<u64> {
        self.properties.timestamp()
    }

    /// The `content_type` property.
    #[must_use]
    pub fn content_type(&self) -> Option<&str> {
        self.properties.content_type()
    }

    /// All AMQP properties.
    #[must_use]
    pub fn properties(&self) -> &Properties {
        &self.properties
    }

    /// Acknowledge this delivery alone (not cumulatively). See the type docs.
    pub async fn ack(&self) -> Result<(), AmqpError> {
        self.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// What an [`crate::AckBatcher`] needs to settle this delivery; keeps no body.
    #[must_use]
    pub fn ack_handle(&self) -> AckHandle {
        AckHandle::new(self.delivery_tag, self.acker.clone())
    }
}

/// The AMQP properties of a [`Delivery`].
#[derive(Debug, Clone)]
pub struct Properties(BasicProperties);

impl Properties {
    /// A header's value if it is a string (long or short string, valid UTF-8).
    #[must_use]
    pub fn header_str(&self, name: &str) -> Option<&str> {
        match self.0.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    /// The `user_id` property.
    #[must_use]
    pub fn user_id(&self) -> Option<&str> {
        self.0.user_id().as_ref().map(|s| s.as_str())
    }

    /// The `message_id` property.
    #[must_use]
    pub fn message_id(&self) -> Option<&str> {
        self.0.message_id().as_ref().map(|s| s.as_str())
    }

    /// The `timestamp` property (seconds since the Unix epoch).
    #[must_use]
    pub fn timestamp(&self) -> Option<u64> {
        *self.0.timestamp()
    }

    /// The `content_type` property.
    #[must_use]
    pub fn content_type(&self) -> Option<&str> {
        self.0.content_type().as_ref().map(|s| s.as_str())
    }

    /// The `delivery_mode` property (2: persistent), as the properties hold it.
    #[must_use]
    pub fn delivery_mode(&self) -> &Option<u8> {
        self.0.delivery_mode()
    }
}
