//! Channels of a [`crate::Connection`]: what topology declarations ([`crate::Topology`]),
//! consumers ([`crate::consume`]) and queue probes ([`crate::queue_message_count`]) work on.

use std::fmt;

use lapin::{
    options::{QueueDeclareOptions, QueueDeleteOptions as LapinQueueDeleteOptions},
    types::FieldTable,
};

use crate::error::{AmqpError, short};

/// An AMQP channel, opened with [`crate::Connection::open_channel`]. Cheap to clone: clones
/// share the channel. A channel error (e.g. a 404 from a passive declare) closes the channel,
/// not the connection.
#[derive(Clone)]
pub struct Channel {
    inner: lapin::Channel,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.id())
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// Flags of [`Channel::queue_delete`]. `Default`: delete unconditionally.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDeleteOptions {
    /// Delete only if the queue has no consumers.
    pub if_unused: bool,
    /// Delete only if the queue holds no messages.
    pub if_empty: bool,
}

impl Channel {
    pub(crate) fn new(inner: lapin::Channel) -> Self {
        Self { inner }
    }

    /// The lapin channel, for this crate only.
    pub(crate) fn lapin(&self) -> &lapin::Channel {
        &self.inner
    }

    /// The channel number on its connection.
    #[must_use]
    pub fn id(&self) -> u16 {
        self.inner.id()
    }

    /// Whether the channel is open and its connection usable.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.inner.status().connected()
    }

    /// Close the channel gracefully (200 OK).
    pub async fn close(&self) -> Result<(), AmqpError> {
        self.inner.close(200, "OK".into()).await?;
        Ok(())
    }

    /// Delete `queue` (an owned name, as the `queue.delete` frame carries it); returns the
    /// number of messages it held. Deleting a missing queue is not an error on RabbitMQ.
    pub async fn queue_delete(
        &self,
        queue: String,
        options: QueueDeleteOptions,
    ) -> Result<u32, AmqpError> {
        let options = LapinQueueDeleteOptions {
            if_unused: options.if_unused,
            if_empty: options.if_empty,
            nowait: false,
        };
        Ok(self.inner.queue_delete(short(&queue)?, options).await?)
    }

    /// Declare a queue the broker names, exclusive to this connection and deleted with it (for
    /// probes and tests); returns its name. Publish to it through the default exchange (`""`)
    /// with its name as routing key.
    pub async fn declare_exclusive_queue(&self) -> Result<String, AmqpError> {
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let queue = self
            .inner
            .queue_declare("".into(), options, FieldTable::default())
            .await?;
        Ok(queue.name().to_string())
    }
}
