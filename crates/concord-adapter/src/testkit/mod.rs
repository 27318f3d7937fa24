//! The test kit: an in-memory bus that runs each system's real engine (state store, merge, echo
//! suppression, id mapping, deduplication) and routes through the real pure router
//! ([`concord_policy::route::process`]), so adapter logic is tested without a broker; and
//! [`MemorySystem`], an in-memory adapter.
//!
//! ```no_run
//! # async fn demo(policy: concord_policy::Policy) -> Result<(), concord_adapter::testkit::TestkitError> {
//! use concord_adapter::testkit::{text, MemorySystem, TestBus};
//! let orders = MemorySystem::new("orders");
//! let support = MemorySystem::new("support");
//! let mut bus = TestBus::new(policy);
//! bus.add("orders", orders.clone()).await?;
//! bus.add("support", support.clone()).await?;
//! orders.edit("customer", "o-1", [("name", text("Ada"))]);
//! bus.run_until_quiet().await?;
//! assert_eq!(support.find("customer", "name", "Ada").is_some(), true);
//! # Ok(()) }
//! ```

mod memory;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use concord_policy::route::{self, Input, Outcome};
use concord_policy::{DeadLetter, Policy, RouterSettings};
use concord_proto::v1::ChangeEvent;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use prost::Message;

pub use memory::{MemorySystem, Record, text};

use crate::adapter::{AdapterError, LocalChange, SystemAdapter};
use crate::engine::{Engine, EngineError, EngineSettings, IncomingError, Processed, now_ms};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::store::{self, Store, StoreError};
use crate::transport::{Link, Outgoing, TransportError};

/// The broker user the bus's router publishes as.
pub const ROUTER_USER: &str = "router";

/// A test-kit failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    #[error("system {0:?} is not on the bus")]
    UnknownSystem(String),
    #[error("system {0:?} is already on the bus")]
    DuplicateSystem(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("still busy after {0} rounds")]
    NotQuiet(usize),
}

/// An incoming message a system dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLettered {
    /// Header `concord-reason`.
    pub reason: String,
    /// Header `concord-detail`.
    pub detail: String,
    /// The original message.
    pub body: Vec<u8>,
}

/// A message the router dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterDeadLetter {
    pub routing_key: String,
    /// The broker user that published it.
    pub user_id: Option<String>,
    pub dead_letter: DeadLetter,
    pub body: Vec<u8>,
}

/// What [`TestBus::run_until_quiet`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quiet {
    /// Rounds run (each: drain every change feed, route, drain every inbox).
    pub rounds: usize,
    /// Messages published or delivered during the run.
    pub messages: u64,
    /// Inbox messages left because applying them kept failing transiently.
    pub stuck: usize,
}

/// The in-memory link: collects what the engine publishes and dead-letters.
#[derive(Debug, Default)]
struct BusLink {
    out: Mutex<Vec<Outgoing>>,
    dead: Mutex<Vec<DeadLettered>>,
}

impl BusLink {
    fn take(&self) -> Vec<Outgoing> {
        std::mem::take(
            &mut *self
                .out
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn take_dead(&self) -> Vec<DeadLettered> {
        std::mem::take(
            &mut *self
                .dead
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl Link for BusLink {
    async fn publish(&self, events: &[Outgoing]) -> Result<(), TransportError> {
        self.out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(events);
        Ok(())
    }
    async fn dead_letter(
        &self,
        body: &[u8],
        reason: &str,
        detail: &str,
    ) -> Result<(), TransportError> {
        self.dead
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(DeadLettered {
                reason: reason.to_owned(),
                detail: detail.to_owned(),
                body: body.to_vec(),
            });
        Ok(())
    }
    async fn ack(&self, _tag: u64) -> Result<(), TransportError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), TransportError> {
        Ok(())
    }
    async fn close(&self) {}
}

/// One system's engine and change feed, with the adapter type erased.
trait Driver: Send {
    /// Processes the changes ready on the feed; returns how many.
    fn local<'a>(&'a mut self, link: &'a BusLink) -> BoxFuture<'a, Result<usize, EngineError>>;
    fn snapshot<'a>(&'a mut self, link: &'a BusLink) -> BoxFuture<'a, Result<usize, EngineError>>;
    fn incoming<'a>(
        &'a mut self,
        body: &'a [u8],
        user_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Processed, IncomingError>>;
    fn incoming_batch<'a>(
        &'a mut self,
        messages: &'a [(&'a [u8], Option<&'a str>)],
    ) -> BoxFuture<'a, Vec<Result<Processed, IncomingError>>>;
    fn store(&self) -> &Store;
}

struct EngineDriver<A> {
    engine: Engine<A>,
    changes: Option<BoxStream<'static, Result<LocalChange, AdapterError>>>,
    batch: usize,
    /// Whether the outbox a previous run left was republished (as the runner does first).
    started: bool,
}

impl<A: SystemAdapter> Driver for EngineDriver<A> {
    fn local<'a>(&'a mut self, link: &'a BusLink) -> BoxFuture<'a, Result<usize, EngineError>> {
        async move {
            let mut total = 0;
            if !self.started {
                total += self.engine.flush_outbox(link).await?;
                self.started = true;
            }
            loop {
                let mut batch = Vec::new();
                while batch.len() < self.batch {
                    let Some(stream) = self.changes.as_mut() else {
                        break;
                    };
                    match stream.next().now_or_never() {
                        Some(Some(Ok(c))) => batch.push(c),
                        Some(Some(Err(e))) => {
                            tracing::warn!(error = %e, "change feed error");
                        }
                        Some(None) => self.changes = None,
                        None => break,
                    }
                }
                if batch.is_empty() {
                    return Ok(total);
                }
                total += batch.len();
                self.engine.handle_local(&batch, false, link).await?;
            }
        }
        .boxed()
    }

    fn snapshot<'a>(&'a mut self, link: &'a BusLink) -> BoxFuture<'a, Result<usize, EngineError>> {
        async move {
            let items: Vec<LocalChange> = self
                .engine
                .adapter()
                .snapshot()
                .filter_map(|r| async move { r.ok() })
                .collect()
                .await;
            self.engine.handle_local(&items, true, link).await
        }
        .boxed()
    }

    fn incoming<'a>(
        &'a mut self,
        body: &'a [u8],
        user_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Processed, IncomingError>> {
        self.engine.handle_incoming(body, user_id).boxed()
    }

    fn incoming_batch<'a>(
        &'a mut self,
        messages: &'a [(&'a [u8], Option<&'a str>)],
    ) -> BoxFuture<'a, Vec<Result<Processed, IncomingError>>> {
        self.engine.handle_incoming_batch(messages).boxed()
    }

    fn store(&self) -> &Store {
        self.engine.store()
    }
}

struct Node {
    system: String,
    driver: Box<dyn Driver>,
    /// Messages in the inbox: body, publisher (`user_id`), failed attempts.
    inbox: VecDeque<(Vec<u8>, Option<String>, usize)>,
    published: Vec<ChangeEvent>,
    delivered: Vec<ChangeEvent>,
    dead: Vec<DeadLettered>,
    metrics: Arc<Metrics>,
}

/// An in-memory message bus with the real router in the middle. See the module docs.
pub struct TestBus {
    policy: Policy,
    settings: RouterSettings,
    nodes: Vec<Node>,
    router_dead: Vec<RouterDeadLetter>,
    messages: u64,
    /// Attempts at a message that fails transiently before the bus leaves it stuck.
    pub max_transient_attempts: usize,
    /// Rounds after which [`TestBus::run_until_quiet`] gives up.
    pub max_rounds: usize,
    /// How long a system's feed may take to report a value the SDK applied (by value), in ms.
    pub echo_window_ms: u64,
}

impl std::fmt::Debug for TestBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBus")
            .field(
                "systems",
                &self.nodes.iter().map(|n| &n.system).collect::<Vec<_>>(),
            )
            .field("messages", &self.messages)
            .finish_non_exhaustive()
    }
}

impl TestBus {
    /// A bus routing with `policy` and the default router settings.
    pub fn new(policy: Policy) -> TestBus {
        TestBus::with_settings(policy, RouterSettings::default())
    }

    pub fn with_settings(policy: Policy, settings: RouterSettings) -> TestBus {
        TestBus {
            policy,
            settings,
            nodes: Vec::new(),
            router_dead: Vec::new(),
            messages: 0,
            max_transient_attempts: 8,
            max_rounds: 10_000,
            echo_window_ms: 3_600_000,
        }
    }

    /// Adds a system with a state store in memory.
    pub async fn add<A: SystemAdapter>(
        &mut self,
        system: &str,
        adapter: A,
    ) -> Result<(), TestkitError> {
        let store = Store::in_memory().await?;
        self.add_with_store(system, Arc::new(adapter), store).await
    }

    /// Adds a system whose state store is the SQLite file at `path` (reopened if it exists).
    pub async fn add_with_state<A: SystemAdapter>(
        &mut self,
        system: &str,
        adapter: A,
        path: &Path,
    ) -> Result<(), TestkitError> {
        let store = Store::open(path).await?;
        self.add_with_store(system, Arc::new(adapter), store).await
    }

    async fn add_with_store<A: SystemAdapter>(
        &mut self,
        system: &str,
        adapter: Arc<A>,
        store: Store,
    ) -> Result<(), TestkitError> {
        if self.nodes.iter().any(|n| n.system == system) {
            return Err(TestkitError::DuplicateSystem(system.to_owned()));
        }
        let entities = self
            .policy
            .entities()
            .iter()
            .map(|e| (e.name.clone(), e.message.clone()))
            .collect();
        let metrics = Arc::new(Metrics::default());
        let cursor = store.cursor().await?;
        let engine = Engine::new(
            system,
            adapter.clone(),
            store,
            entities,
            metrics.clone(),
            EngineSettings {
                // Each system publishes as the broker user of its own name.
                publish_user_id: Some(system.to_owned()),
                router_user: ROUTER_USER.to_owned(),
                echo_window_ms: self.echo_window_ms,
                clock_skew_ms: self.settings.clock_skew_ms,
                max_message_bytes: self.settings.max_message_bytes,
            },
        )
        .await?;
        let changes = adapter.changes(cursor).boxed();
        self.nodes.push(Node {
            system: system.to_owned(),
            driver: Box::new(EngineDriver {
                engine,
                changes: Some(changes),
                batch: 64,
                started: false,
            }),
            inbox: VecDeque::new(),
            published: Vec::new(),
            delivered: Vec::new(),
            dead: Vec::new(),
            metrics,
        });
        Ok(())
    }

    /// Takes a system off the bus and closes its state store (its undelivered inbox messages
    /// are dropped, as if they had never been routed).
    pub async fn remove(&mut self, system: &str) -> Result<(), TestkitError> {
        let i = self.index(system)?;
        let node = self.nodes.remove(i);
        node.driver.store().close().await;
        Ok(())
    }

    fn index(&self, system: &str) -> Result<usize, TestkitError> {
        self.nodes
            .iter()
            .position(|n| n.system == system)
            .ok_or_else(|| TestkitError::UnknownSystem(system.to_owned()))
    }

    fn node(&self, system: &str) -> Result<&Node, TestkitError> {
        self.index(system).and_then(|i| {
            self.nodes
                .get(i)
                .ok_or_else(|| TestkitError::UnknownSystem(system.to_owned()))
        })
    }

    fn node_mut(&mut self, system: &str) -> Result<&mut Node, TestkitError> {
        let i = self.index(system)?;
        self.nodes
            .get_mut(i)
            .ok_or_else(|| TestkitError::UnknownSystem(system.to_owned()))
    }

    /// Routes what a system published through the router into the inboxes.
    fn route(&mut self, from: usize, out: Vec<Outgoing>) {
        for o in out {
            if let (Ok(ev), Some(node)) = (
                ChangeEvent::decode(o.body.as_slice()),
                self.nodes.get_mut(from),
            ) {
                node.published.push(ev);
            }
            self.route_input(o);
        }
    }

    /// Routes one input of system `from` through the router into the inboxes.
    fn route_input(&mut self, o: Outgoing) {
        if o.control.is_some() {
            // Progress reports go to the operator, not to the systems.
            return;
        }
        self.messages += 1;
        let input = Input {
            routing_key: &o.routing_key,
            body: &o.body,
            user_id: o.user_id.as_deref(),
            concord_key: None,
        };
        let outcome = match &o.resync_target {
            Some(target) => {
                route::process_resync(&self.policy, &self.settings, now_ms(), input, Some(target))
            }
            None => route::process(&self.policy, &self.settings, now_ms(), input),
        };
        match outcome {
            Outcome::Routed(r) => {
                if let Some(d) = r.dead_letter {
                    self.router_dead.push(RouterDeadLetter {
                        routing_key: o.routing_key.clone(),
                        user_id: o.user_id.clone(),
                        dead_letter: d,
                        body: o.body.clone(),
                    });
                }
                for d in r.deliveries {
                    // A system of the policy that is not on the bus receives nothing.
                    if let Some(node) = self.nodes.iter_mut().find(|n| n.system == d.system) {
                        self.messages += 1;
                        if let Ok(ev) = ChangeEvent::decode(d.body.as_slice()) {
                            node.delivered.push(ev);
                        }
                        node.inbox
                            .push_back((d.body, Some(ROUTER_USER.to_owned()), 0));
                    }
                }
            }
            Outcome::DeadLetter(d) => self.router_dead.push(RouterDeadLetter {
                routing_key: o.routing_key,
                user_id: o.user_id,
                dead_letter: d,
                body: o.body,
            }),
        }
    }

    /// Runs every system until nothing moves: each round drains every change feed (publishing
    /// and routing), then every inbox (applying). Quiet means a few rounds in a row in which no
    /// change was ready and no message was waiting.
    pub async fn run_until_quiet(&mut self) -> Result<Quiet, TestkitError> {
        let start = self.messages;
        let mut idle = 0;
        for round in 1..=self.max_rounds {
            let mut progress = false;
            for i in 0..self.nodes.len() {
                let link = BusLink::default();
                let Some(node) = self.nodes.get_mut(i) else {
                    continue;
                };
                progress |= node.driver.local(&link).await? > 0;
                node.dead.extend(link.take_dead());
                self.route(i, link.take());
            }
            for node in &mut self.nodes {
                progress |= drain_inbox(node, self.max_transient_attempts).await;
            }
            if progress {
                idle = 0;
            } else {
                idle += 1;
                if idle >= 3 {
                    return Ok(Quiet {
                        rounds: round,
                        messages: self.messages - start,
                        stuck: self.nodes.iter().map(|n| n.inbox.len()).sum(),
                    });
                }
                tokio::task::yield_now().await;
            }
        }
        Err(TestkitError::NotQuiet(self.max_rounds))
    }

    /// Publishes a snapshot of every record of `system` (`OP_SNAPSHOT`) and routes it.
    pub async fn snapshot(&mut self, system: &str) -> Result<usize, TestkitError> {
        let i = self.index(system)?;
        let link = BusLink::default();
        let n = match self.nodes.get_mut(i) {
            Some(node) => node.driver.snapshot(&link).await?,
            None => 0,
        };
        if let Some(node) = self.nodes.get_mut(i) {
            node.dead.extend(link.take_dead());
        }
        self.route(i, link.take());
        Ok(n)
    }

    /// Puts an event into a system's inbox as if the router had routed it.
    pub fn inject(&mut self, system: &str, event: &ChangeEvent) -> Result<(), TestkitError> {
        self.inject_raw(system, event.encode_to_vec())
    }

    /// Puts raw bytes into a system's inbox as if the router had published them.
    pub fn inject_raw(&mut self, system: &str, body: Vec<u8>) -> Result<(), TestkitError> {
        self.inject_as(system, Some(ROUTER_USER), body)
    }

    /// Puts raw bytes into a system's inbox as published by broker user `user_id` (e.g. another
    /// system's, or none): the adapter must refuse what the router did not publish.
    pub fn inject_as(
        &mut self,
        system: &str,
        user_id: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(), TestkitError> {
        let node = self.node_mut(system)?;
        node.inbox.push_back((body, user_id.map(str::to_owned), 0));
        Ok(())
    }

    /// Events `system` published, in order.
    pub fn published(&self, system: &str) -> Vec<ChangeEvent> {
        self.node(system)
            .map(|n| n.published.clone())
            .unwrap_or_default()
    }

    /// Routed events delivered to `system`'s inbox, in order (not the injected ones).
    pub fn delivered(&self, system: &str) -> Vec<ChangeEvent> {
        self.node(system)
            .map(|n| n.delivered.clone())
            .unwrap_or_default()
    }

    /// Messages `system` dead-lettered.
    pub fn dead_lettered(&self, system: &str) -> Vec<DeadLettered> {
        self.node(system)
            .map(|n| n.dead.clone())
            .unwrap_or_default()
    }

    /// Messages the router dead-lettered.
    pub fn router_dead_letters(&self) -> &[RouterDeadLetter] {
        &self.router_dead
    }

    /// The router reloads `policy` (systems on the bus keep running).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Routes the router's dead letters again, as an operator's redrive does after fixing their
    /// cause; returns how many. Those dead-lettered again are kept.
    pub fn replay_router_dead_letters(&mut self) -> usize {
        let dead = std::mem::take(&mut self.router_dead);
        let n = dead.len();
        for d in dead {
            let event_id = ChangeEvent::decode(d.body.as_slice())
                .map(|ev| ev.event_id)
                .unwrap_or_default();
            self.route_input(Outgoing {
                routing_key: d.routing_key,
                body: d.body,
                event_id,
                concord_key: String::new(),
                user_id: d.user_id,
                resync_target: None,
                control: None,
            });
        }
        n
    }

    /// Messages waiting in `system`'s inbox.
    pub fn pending(&self, system: &str) -> usize {
        self.node(system).map(|n| n.inbox.len()).unwrap_or_default()
    }

    /// Messages published plus messages delivered, since the bus was created.
    pub fn message_count(&self) -> u64 {
        self.messages
    }

    /// The engine counters of `system`.
    pub fn metrics(&self, system: &str) -> MetricsSnapshot {
        self.node(system)
            .map(|n| n.metrics.snapshot())
            .unwrap_or_default()
    }

    /// The state store of `system`.
    pub fn state(&self, system: &str) -> Result<&Store, TestkitError> {
        Ok(self.node(system)?.driver.store())
    }

    /// The canonical key `system` maps its local record to.
    pub async fn key_of(
        &self,
        system: &str,
        entity: &str,
        local_id: &str,
    ) -> Result<Option<String>, TestkitError> {
        Ok(self.state(system)?.key_of(entity, local_id).await?)
    }

    /// The local id `system` maps a canonical key to.
    pub async fn local_id_of(
        &self,
        system: &str,
        entity: &str,
        key: &str,
    ) -> Result<Option<String>, TestkitError> {
        Ok(self
            .state(system)?
            .record(entity, key)
            .await?
            .filter(|r| r.live)
            .and_then(|r| r.local_id))
    }

    /// The persisted change-feed cursor of `system`.
    pub async fn cursor(&self, system: &str) -> Result<Option<String>, TestkitError> {
        Ok(self.state(system)?.meta(store::CURSOR).await?)
    }
}

/// Messages of an inbox processed together, as the runner takes what its prefetch holds.
const INBOX_BATCH: usize = 64;

/// Processes a node's inbox in order, as the runner does: what is waiting in batches (applied
/// with one `apply_batch` each), a message the engine leaves out of a batch alone; returns
/// whether anything moved.
async fn drain_inbox(node: &mut Node, max_attempts: usize) -> bool {
    let mut progress = false;
    loop {
        let take = node.inbox.len().min(INBOX_BATCH);
        if take > 1 {
            let batch: Vec<_> = node.inbox.drain(..take).collect();
            let messages: Vec<(&[u8], Option<&str>)> = batch
                .iter()
                .map(|(body, user_id, _)| (body.as_slice(), user_id.as_deref()))
                .collect();
            let results = node.driver.incoming_batch(&messages).await;
            let mut done = 0;
            for (r, (body, ..)) in results.into_iter().zip(&batch) {
                match r {
                    Ok(_) => {}
                    Err(IncomingError::Permanent { reason, detail }) => {
                        Metrics::inc(&node.metrics.dead_lettered);
                        node.dead.push(DeadLettered {
                            reason: reason.as_str().to_owned(),
                            detail,
                            body: body.clone(),
                        });
                    }
                    Err(IncomingError::Transient(_)) => break,
                }
                done += 1;
            }
            // The rest goes back to the front, in order.
            for item in batch.into_iter().skip(done).rev() {
                node.inbox.push_front(item);
            }
            if done > 0 {
                progress = true;
                continue;
            }
        }
        let Some((body, user_id, attempts)) = node.inbox.pop_front() else {
            return progress;
        };
        match node.driver.incoming(&body, user_id.as_deref()).await {
            Ok(_) => progress = true,
            Err(IncomingError::Permanent { reason, detail }) => {
                Metrics::inc(&node.metrics.dead_lettered);
                node.dead.push(DeadLettered {
                    reason: reason.as_str().to_owned(),
                    detail,
                    body,
                });
                progress = true;
            }
            Err(IncomingError::Transient(e)) => {
                Metrics::inc(&node.metrics.retries);
                tracing::debug!(system = %node.system, error = %e, "transient failure; retried next round");
                // Keep the order: nothing behind it is processed before it.
                let attempts = attempts + 1;
                node.inbox.push_front((body, user_id, attempts));
                return progress || attempts < max_attempts;
            }
        }
    }
}
