//! What the child processes run (see `child.rs`): the real router, or the baseline forwarder.

use std::future::Future;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::pin::Pin;

use anyhow::{Context as _, bail};
use concord_amqp::{
    AckBatcher, AckHandle, Consumer, MessageProps, PendingConfirm, PublishError, Publisher,
    PublisherOptions, Topology, connect, connection_name, consume,
};
use concord_router::{Router, RouterConfig};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::event;

/// Everything a child needs.
#[derive(Debug, Clone)]
pub struct ChildArgs {
    pub amqp_uri: String,
    pub namespace: String,
    pub policy: Option<PathBuf>,
    pub fanout: usize,
    pub prefetch: u16,
    pub confirm_window: usize,
    pub ack_batch: usize,
    /// Worker threads of the child's runtime (`RouterConfig::worker_threads`).
    pub worker_threads: usize,
}

impl ChildArgs {
    /// The command-line arguments that carry these settings to a child.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--amqp-uri".to_owned(),
            self.amqp_uri.clone(),
            "--namespace".to_owned(),
            self.namespace.clone(),
            "--fanout".to_owned(),
            self.fanout.to_string(),
            "--prefetch".to_owned(),
            self.prefetch.to_string(),
            "--confirm-window".to_owned(),
            self.confirm_window.to_string(),
            "--ack-batch".to_owned(),
            self.ack_batch.to_string(),
            "--worker-threads".to_owned(),
            self.worker_threads.to_string(),
            // Children never run the parent's workload; clap still wants --events.
            "--events".to_owned(),
            "0".to_owned(),
        ];
        if let Some(policy) = &self.policy {
            args.push("--policy".to_owned());
            args.push(policy.display().to_string());
        }
        args
    }
}

/// Resolves when the parent closes our stdin (or dies), or on SIGTERM / SIGINT.
fn shutdown_signal() -> anyhow::Result<Pin<Box<dyn Future<Output = ()> + Send>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (tx, rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("stdin-eof".to_owned())
        .spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            let _ = tx.send(());
        })
        .context("starting the stdin watcher")?;
    Ok(Box::pin(async move {
        tokio::select! {
            _ = rx => info!("stdin closed: draining"),
            _ = term.recv() => info!("SIGTERM: draining"),
            _ = int.recv() => info!("SIGINT: draining"),
        }
    }))
}

fn announce_ready() -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").context("writing to stdout")?;
    out.flush().context("writing to stdout")
}

/// The router child: exactly what `concord router` runs (`Router::start`, then `run_until`
/// SIGTERM / SIGINT, as `concord_router::run_until_signalled` does; also stops on stdin EOF),
/// with the benchmark's namespace and an ephemeral HTTP port.
pub async fn router(args: ChildArgs) -> anyhow::Result<()> {
    let policy = args.policy.context("the router role needs --policy")?;
    let login = concord_amqp::login_of(&args.amqp_uri)?;
    let config = RouterConfig {
        amqp_uri: args.amqp_uri,
        namespace: args.namespace,
        prefetch: args.prefetch,
        confirm_window: args.confirm_window,
        ack_batch: args.ack_batch,
        worker_threads: args.worker_threads,
        http_listen: "127.0.0.1:0".to_owned(),
        // The load generator publishes as the bench's broker user, for the one source system.
        users: [(login, event::SOURCE.to_owned())].into(),
        ..RouterConfig::default()
    };
    let shutdown = shutdown_signal()?;
    let handle = Router::start(config, policy).await?;
    tokio::time::timeout(std::time::Duration::from_secs(60), handle.wait_ready())
        .await
        .context("the router was not ready within 60 s")?
        .context("the router stopped before it was ready")?;
    announce_ready()?;
    handle.run_until(shutdown).await
}

/// One input in flight in the forwarder: its K publishes, awaited in order.
struct InFlight {
    ack: AckHandle,
    confirms: Vec<PendingConfirm>,
}

struct Settled {
    ack: AckHandle,
    publishes: usize,
    result: Result<(), PublishError>,
}

async fn settle(p: InFlight) -> Settled {
    let publishes = p.confirms.len();
    let mut result = Ok(());
    for confirm in p.confirms {
        if let Err(e) = confirm.await
            && result.is_ok()
        {
            result = Err(e);
        }
    }
    Settled {
        ack: p.ack,
        publishes,
        result,
    }
}

/// The baseline: a plain AMQP forwarder with the router's guarantees and tuning. It consumes
/// its input queue with the same prefetch, republishes each body unchanged to the K inboxes
/// (K persistent, mandatory publishes through the same `Publisher` with the same confirm
/// window, carrying the same properties the router sets: origin and key headers and the
/// message id), acknowledges an input only once all K publishes are confirmed, with the same
/// ack batching, and stops consuming while `confirm_window` publishes are outstanding — the
/// router's session loop without the policy work.
pub async fn forwarder(args: ChildArgs) -> anyhow::Result<()> {
    let topology = Topology::new(args.namespace.clone());
    let targets = event::subscribers(args.fanout);
    let role = format!("concord-bench-forwarder/{}", args.namespace);
    let consume_conn =
        connect(&args.amqp_uri, &connection_name(&format!("{role}/consume"))).await?;
    let publish_conn =
        connect(&args.amqp_uri, &connection_name(&format!("{role}/publish"))).await?;
    let publisher = Publisher::open(
        &publish_conn,
        PublisherOptions {
            window: args.confirm_window,
        },
    )
    .await?;
    let channel = consume_conn.open_channel().await?;
    let consumer = consume(
        &channel,
        &topology.router_queue(),
        &connection_name(&role),
        args.prefetch,
    )
    .await?;
    let shutdown = shutdown_signal()?;
    announce_ready()?;
    // A spawned task, like the router's pipeline (not the `block_on` future).
    let forwarding = tokio::spawn(forward(
        consumer,
        publisher.clone(),
        shutdown,
        topology.routed_exchange(),
        targets,
        args.ack_batch,
        args.confirm_window,
    ));
    forwarding.await.context("the forwarder task panicked")??;
    if let Err(e) = publisher.close().await {
        warn!(error = %e, "closing the publisher failed");
    }
    let _ = consume_conn.close().await;
    let _ = publish_conn.close().await;
    Ok(())
}

/// The forwarding loop: the router's session loop without the policy work.
async fn forward(
    mut consumer: Consumer,
    publisher: Publisher,
    mut shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    routed: String,
    targets: Vec<String>,
    ack_batch: usize,
    confirm_window: usize,
) -> anyhow::Result<()> {
    let mut batcher = AckBatcher::new(ack_batch);
    let mut in_flight = FuturesOrdered::new();
    let mut outstanding = 0usize;
    let mut consuming = true;
    let mut draining = false;
    loop {
        if draining && !consuming && in_flight.is_empty() {
            batcher.flush().await?;
            break;
        }
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let done: Settled = done;
                outstanding -= done.publishes;
                done.result.context("a forwarded publish was not delivered")?;
                batcher.ack(done.ack).await?;
                if in_flight.is_empty() {
                    batcher.flush().await?;
                }
            }
            delivery = consumer.next(), if consuming && outstanding < confirm_window => {
                match delivery {
                    Some(Ok(delivery)) => {
                        let origin = delivery
                            .routing_key
                            .split_once('.')
                            .map_or(delivery.routing_key.as_str(), |(system, _)| system);
                        let mut props = MessageProps::new().header(concord_router::HEADER_ORIGIN, origin);
                        if let Some(key) = delivery.header_str(event::HEADER_KEY) {
                            props = props.header(concord_router::HEADER_KEY, key);
                        }
                        if let Some(id) = delivery.message_id() {
                            props = props.message_id(id);
                        }
                        let mut confirms = Vec::with_capacity(targets.len());
                        for target in &targets {
                            confirms.push(
                                publisher
                                    .publish(&routed, target, &delivery.body, props.clone())
                                    .await?,
                            );
                        }
                        outstanding += confirms.len();
                        in_flight.push_back(settle(InFlight { ack: delivery.ack_handle(), confirms }));
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => {
                        consuming = false;
                        if !draining {
                            bail!("the forwarder's consumer was cancelled");
                        }
                    }
                }
            }
            () = &mut shutdown, if !draining => {
                draining = true;
                batcher.flush().await?;
                consumer.cancel().await?;
            }
        }
    }
    Ok(())
}
