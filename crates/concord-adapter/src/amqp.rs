//! The AMQP transport, over `concord-amqp`: one named connection per session with a consumer
//! channel (inbox, bounded prefetch, batched cumulative acks) and a confirm-mode publisher
//! channel (pipelined confirms) for the ingress exchange and the dead-letter exchange.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_amqp::{
    AckBatcher, AckHandle, Connection, MessageProps, Publisher, PublisherOptions, Topology,
};
use futures::StreamExt;
use tracing::{debug, warn};

use crate::config::RunnerConfig;
use crate::transport::{Inbox, Incoming, Link, Outgoing, Transport, TransportError};

use concord_amqp::{
    HEADER_CONTROL, HEADER_DETAIL, HEADER_KEY, HEADER_REASON, HEADER_RESYNC_TARGET,
};

/// Longest `concord-detail` header value sent, in bytes.
const MAX_DETAIL: usize = 1024;

/// Connects to RabbitMQ for one system.
#[derive(Debug, Clone)]
pub struct AmqpTransport {
    uri: String,
    system: String,
    prefetch: u16,
    topology: Topology,
    tls: Option<concord_amqp::TlsFiles>,
}

impl AmqpTransport {
    pub fn new(config: &RunnerConfig) -> AmqpTransport {
        AmqpTransport {
            tls: config.tls.clone(),
            uri: config.amqp_uri.clone(),
            system: config.system.clone(),
            prefetch: config.prefetch,
            topology: Topology::new(config.namespace.clone()),
        }
    }
}

fn conn_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::connection(e)
}

impl Transport for AmqpTransport {
    type Link = AmqpLink;

    async fn connect(&self) -> Result<(AmqpLink, Inbox), TransportError> {
        let name = concord_amqp::connection_name(&format!("concord-adapter-{}", self.system));
        let tls = match &self.tls {
            Some(files) => Some(files.load().map_err(conn_err)?),
            None => None,
        };
        let options = concord_amqp::ConnectOptions {
            tls,
            ..concord_amqp::ConnectOptions::default()
        };
        let conn = concord_amqp::connect_with(&self.uri, &name, &options)
            .await
            .map_err(conn_err)?;
        // The router (or the broker definitions) declares the inbox; the adapter only checks it
        // is there, which needs no permission.
        let consume_channel = conn.open_channel().await.map_err(conn_err)?;
        self.topology
            .check_inbox(&consume_channel, &self.system)
            .await
            .map_err(|e| {
                conn_err(format!(
                    "inbox {} not found (is the router running, with this system in its policy?): {e}",
                    self.topology.inbox(&self.system)
                ))
            })?;
        let publisher = Publisher::open(&conn, PublisherOptions::default())
            .await
            .map_err(conn_err)?;
        let inbox_name = self.topology.inbox(&self.system);
        let tag = format!("{name}-{}", uuid::Uuid::now_v7());
        let consumer = concord_amqp::consume(&consume_channel, &inbox_name, &tag, self.prefetch)
            .await
            .map_err(conn_err)?;
        let handles: Arc<Mutex<HashMap<u64, AckHandle>>> = Arc::default();
        let inbox_handles = handles.clone();
        let inbox = consumer
            .map(move |r| match r {
                Ok(d) => {
                    let handle = d.ack_handle();
                    let tag = d.delivery_tag;
                    lock(&inbox_handles).insert(tag, handle);
                    let user_id = d.user_id().map(str::to_owned);
                    let control = d.header_str(HEADER_CONTROL).map(str::to_owned);
                    Ok(Incoming {
                        body: d.body,
                        tag,
                        redelivered: d.redelivered,
                        user_id,
                        control,
                    })
                }
                Err(e) => Err(conn_err(e)),
            })
            .boxed();
        debug!(system = %self.system, inbox = %inbox_name, "connected");
        let link = AmqpLink {
            conn,
            publisher,
            ingress: self.topology.ingress_exchange(),
            resync: self.topology.resync_exchange(),
            dlx: self.topology.dlx(),
            inbox: inbox_name.clone(),
            system: self.system.clone(),
            acks: tokio::sync::Mutex::new(AckBatcher::for_prefetch(self.prefetch)),
            handles,
        };
        Ok((link, inbox))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The sending side of one AMQP session.
#[derive(Debug)]
pub struct AmqpLink {
    conn: Connection,
    publisher: Publisher,
    ingress: String,
    resync: String,
    dlx: String,
    inbox: String,
    system: String,
    acks: tokio::sync::Mutex<AckBatcher>,
    handles: Arc<Mutex<HashMap<u64, AckHandle>>>,
}

/// How long the broker may take to take an acknowledgement. A connection whose peer died
/// without the client noticing (seen after a cluster node was killed: the session waited
/// forever) is then given up and reopened.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// `op`, failing as a lost connection when it takes longer than [`ANSWER_TIMEOUT`].
async fn answered<T>(
    what: &str,
    op: impl Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    tokio::time::timeout(ANSWER_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| {
            Err(TransportError::connection(format!(
                "no answer from the broker to {what} within {ANSWER_TIMEOUT:?}"
            )))
        })
}

fn publish_err(e: concord_amqp::PublishError) -> TransportError {
    match e {
        concord_amqp::PublishError::Connection(e) => conn_err(e),
        other => TransportError::refused(other),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Link for AmqpLink {
    async fn publish(&self, events: &[Outgoing]) -> Result<(), TransportError> {
        let mut pending = Vec::with_capacity(events.len());
        for ev in events {
            let mut props = MessageProps::new()
                .message_id(&ev.event_id)
                .header(HEADER_KEY, &ev.concord_key)
                .timestamp_now();
            if let Some(u) = &ev.user_id {
                props = props.user_id(u);
            }
            if let Some(target) = &ev.resync_target {
                props = props.header(HEADER_RESYNC_TARGET, target);
            }
            if let Some(control) = &ev.control {
                props = props.header(HEADER_CONTROL, control);
            }
            let exchange = if ev.on_resync_lane() {
                &self.resync
            } else {
                &self.ingress
            };
            let confirm = self
                .publisher
                .publish(exchange, &ev.routing_key, &ev.body, props)
                .await
                .map_err(conn_err)?;
            pending.push(confirm);
        }
        // Every confirm must be positive; the first failure fails the batch. The caller
        // republishes all of it from its outbox with the same event ids and bytes: delivery is
        // at-least-once, and receivers (the adapters' state stores) deduplicate by event id.
        for r in futures::future::join_all(pending).await {
            r.map_err(publish_err)?;
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        body: &[u8],
        reason: &str,
        detail: &str,
    ) -> Result<(), TransportError> {
        let props = MessageProps::new()
            .header(HEADER_REASON, reason)
            .header(HEADER_DETAIL, truncate(detail, MAX_DETAIL))
            .timestamp_now();
        self.publisher
            .publish_confirmed(&self.dlx, &self.system, body, props)
            .await
            .map_err(publish_err)
    }

    async fn ack(&self, tag: u64) -> Result<(), TransportError> {
        let Some(handle) = lock(&self.handles).remove(&tag) else {
            warn!(tag, "ack of an unknown delivery tag");
            return Ok(());
        };
        answered("an acknowledgement", async {
            self.acks.lock().await.ack(handle).await.map_err(conn_err)
        })
        .await
    }

    async fn flush(&self) -> Result<(), TransportError> {
        answered("acknowledgements", async {
            self.acks.lock().await.flush().await.map_err(conn_err)
        })
        .await
    }

    async fn close(&self) {
        if let Err(e) = self.flush().await {
            debug!(error = %e, "flushing acks at close");
        }
        // Confirms can only come on an open channel (the runner bounds the whole close).
        if self.publisher.is_open()
            && let Err(e) = self.publisher.wait_idle().await
        {
            debug!(error = %e, "waiting for confirms at close");
        }
        if let Err(e) = self.conn.close().await {
            debug!(error = %e, "closing the connection");
        }
    }

    async fn inbox_ready(&self) -> Result<Option<u64>, TransportError> {
        // On a channel of its own: a failed passive declare closes its channel. (The runner
        // bounds how long it waits for the answer.)
        let channel = self.conn.open_channel().await.map_err(conn_err)?;
        let ready = concord_amqp::queue_message_count(&channel, &self.inbox)
            .await
            .map_err(conn_err)?;
        if let Err(e) = channel.close().await {
            debug!(error = %e, "closing the inbox-check channel");
        }
        Ok(Some(u64::from(ready)))
    }
}
