//! The engine: the shell around the adapter rules of `concord-policy`
//! ([`concord_policy::replica::Replica`]), shared by the AMQP runner and the in-memory test bus.
//! For each local change or incoming event it loads the record's state from the store, runs one
//! step of the machine, and performs the step's effects: the store write (in one SQLite
//! transaction with the outbox or the event's deduplication), the publish, the apply.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use concord_policy::replica::{
    ApplyPlan, IncomingStep, LocalEdit, LocalStep, Ranks, RecordState, Replica, Value,
    change_event, decode_copy,
};
use concord_policy::route::DeadLetterReason;
use concord_policy::value::{decode_field, encode_field};
use concord_proto::v1::ChangeEvent;
use prost::Message;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use sqlx::SqliteConnection;
use tracing::{debug, warn};

use crate::adapter::{AdapterError, Applied, Apply, LocalChange, SystemAdapter};
use crate::metrics::Metrics;
use crate::store::{self, OutboxEntry, Parked, Store, StoreError};
use crate::transport::{Link, Outgoing, TransportError};

pub(crate) use concord_amqp::now_ms;

/// Why the engine could not be set up or could not process local changes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// What became of an incoming event that was processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// Fields won the merge and were applied to the system.
    Applied,
    /// Only the state store changed (e.g. a delete of a record the system never had).
    Recorded,
    /// Already processed before (redelivered or duplicated).
    Duplicate,
    /// Nothing in it is newer than what the replica holds.
    Stale,
}

/// Why an incoming event was not processed.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// It can never be processed: dead-letter it (`reason` goes into header `concord-reason`).
    #[error("{}: {detail}", reason.as_str())]
    Permanent {
        reason: DeadLetterReason,
        detail: String,
    },
    /// Retry it later, in order.
    #[error("transient: {0}")]
    Transient(#[source] AdapterError),
}

impl From<StoreError> for IncomingError {
    fn from(e: StoreError) -> Self {
        IncomingError::Transient(AdapterError::transient(e))
    }
}

impl From<sqlx::Error> for IncomingError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::from(e).into()
    }
}

fn permanent(reason: DeadLetterReason, detail: impl Into<String>) -> IncomingError {
    IncomingError::Permanent {
        reason,
        detail: detail.into(),
    }
}

/// An inbox message processed up to the apply.
enum Prepared {
    /// Nothing to apply: this became of it.
    Done(Processed),
    Apply(Box<Pending>),
}

/// What to apply for an inbox message, and what to record once it is applied.
struct Pending {
    seen_key: String,
    /// The record's state before the message.
    before: RecordState,
    /// The state recorded so far (with the pending fields when recorded first).
    recorded: RecordState,
    /// The state once applied.
    state: RecordState,
    plan: ApplyPlan,
    apply: Apply,
}

/// How an engine works, beyond its system and adapter.
#[derive(Debug, Clone)]
pub(crate) struct EngineSettings {
    /// The AMQP `user_id` of published events (the broker user the adapter logs in as).
    pub(crate) publish_user_id: Option<String>,
    /// The broker user the router publishes as: only what it published is applied.
    pub(crate) router_user: String,
    pub(crate) echo_window_ms: u64,
    pub(crate) clock_skew_ms: u64,
    /// Largest incoming message processed; a larger one is dead-lettered undecoded.
    pub(crate) max_message_bytes: usize,
}

impl EngineSettings {
    pub(crate) fn of(config: &crate::config::RunnerConfig) -> EngineSettings {
        // The URI was checked when the configuration was validated; a URI without a user logs
        // in as guest.
        let login = concord_amqp::login_of(&config.amqp_uri).unwrap_or_else(|_| "guest".into());
        EngineSettings {
            publish_user_id: config.publish_user_id.then_some(login),
            router_user: config.router_user.clone(),
            echo_window_ms: config.echo_window_secs.saturating_mul(1000),
            clock_skew_ms: config.clock_skew_ms,
            max_message_bytes: config.max_message_bytes,
        }
    }
}

/// The engine of one system.
#[derive(Debug)]
pub(crate) struct Engine<A> {
    system: String,
    adapter: Arc<A>,
    store: Store,
    replica: Replica,
    entities: HashMap<String, MessageDescriptor>,
    metrics: Arc<Metrics>,
    publish_user_id: Option<String>,
    router_user: String,
    max_message_bytes: usize,
    /// The last cursor the adapter was told is published.
    confirmed: Option<String>,
}

impl<A: SystemAdapter> Engine<A> {
    /// The engine of `system`, for the `entities` of the deployment (entity name → message).
    pub(crate) async fn new(
        system: &str,
        adapter: Arc<A>,
        store: Store,
        entities: HashMap<String, MessageDescriptor>,
        metrics: Arc<Metrics>,
        settings: EngineSettings,
    ) -> Result<Engine<A>, EngineError> {
        let replica = Replica::new(
            system,
            adapter.echoes(),
            settings.echo_window_ms,
            store.max_hlc().await?,
        )
        .with_clock_skew(settings.clock_skew_ms);
        Ok(Engine {
            system: system.to_owned(),
            adapter,
            store,
            replica,
            entities,
            metrics,
            publish_user_id: settings.publish_user_id,
            router_user: settings.router_user,
            max_message_bytes: settings.max_message_bytes,
            confirmed: None,
        })
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub(crate) fn adapter(&self) -> &Arc<A> {
        &self.adapter
    }

    pub(crate) fn system(&self) -> &str {
        &self.system
    }

    pub(crate) fn router_user(&self) -> &str {
        &self.router_user
    }

    /// A resync snapshot of one record for `target`: the `fields` this system wrote last
    /// (name, stored value, clock), each with its own clock, so that a receiver keeps whatever
    /// is newer and a resync run again changes nothing. `None` for an entity no longer in the
    /// deployment.
    pub(crate) fn resync_event(
        &self,
        entity: &str,
        key: &str,
        fields: &[(String, Option<Vec<u8>>, u64)],
        target: &str,
    ) -> Option<Outgoing> {
        let message = self.entities.get(entity)?;
        let publish = concord_policy::replica::Publish {
            op: concord_policy::Op::Snapshot,
            hlc: 0,
            fields: fields
                .iter()
                .map(|(name, value, _)| concord_policy::replica::PublishedField {
                    name: name.clone(),
                    value: value.clone(),
                    rank: 0,
                })
                .collect(),
        };
        let mut ev = change_event(
            &self.system,
            entity,
            key,
            message,
            &publish,
            uuid::Uuid::now_v7().to_string(),
            now_ms(),
        );
        for (name, _, hlc) in fields {
            if let Some(clock) = ev.clocks.get_mut(name) {
                clock.hlc = *hlc;
            }
        }
        let mut out = self.outgoing(&ev);
        out.resync_target = Some(target.to_owned());
        Some(out)
    }

    /// A progress report of resync `id` (to the operator, through the router).
    pub(crate) fn resync_progress(
        &self,
        id: &str,
        target: &str,
        done: u64,
        total: u64,
        finished: bool,
    ) -> Outgoing {
        let body = concord_proto::v1::ResyncProgress {
            id: id.to_owned(),
            system: self.system.clone(),
            target: target.to_owned(),
            done,
            total,
            finished,
        }
        .encode_to_vec();
        Outgoing {
            routing_key: format!("{}.progress", self.system),
            body,
            event_id: uuid::Uuid::now_v7().to_string(),
            concord_key: String::new(),
            user_id: self.publish_user_id.clone(),
            resync_target: None,
            control: Some("progress".to_owned()),
        }
    }

    /// Processes one inbox message. Idempotent: processing the same message again (after a
    /// transient failure or a redelivery) is safe.
    pub(crate) async fn handle_incoming(
        &mut self,
        body: &[u8],
        user_id: Option<&str>,
    ) -> Result<Processed, IncomingError> {
        let r = match self.trusted(user_id) {
            Ok(()) => self.incoming(body).await,
            Err(e) => Err(e),
        };
        // Counted once it is done with (not at each transient failure): `incoming` then tells
        // how many messages were processed, as the batch path counts them.
        if !matches!(r, Err(IncomingError::Transient(_))) {
            Metrics::inc(&self.metrics.incoming);
        }
        self.counted(&r);
        r
    }

    /// Processes several inbox messages (body, publisher), in order, applying those that need it
    /// with ONE call of [`SystemAdapter::apply_batch`] and recording them in two store
    /// transactions (one before the apply, one after). Returns what became of a prefix of them,
    /// in order, with no transient error in it: the message that failed transiently (or could
    /// not be taken into this batch, because an earlier one in it concerns the same record) and
    /// every one after it are left to [`Engine::handle_incoming`], one by one. Idempotent like it.
    pub(crate) async fn handle_incoming_batch(
        &mut self,
        messages: &[(&[u8], Option<&str>)],
    ) -> Vec<Result<Processed, IncomingError>> {
        // What became of each message taken; `None`: its apply is pending.
        let mut results: Vec<Option<Result<Processed, IncomingError>>> = Vec::new();
        let mut pending: Vec<(usize, Pending)> = Vec::new();
        let mut records: HashSet<(String, String)> = HashSet::new();
        let Ok(mut tx) = self.store.begin().await else {
            return Vec::new();
        };
        let mut ranks = RankCache::default();
        let mut writes = store::Writes::default();
        let mut loaded = match Preloaded::load(&mut tx, messages).await {
            Ok(loaded) => loaded,
            Err(e) => {
                debug!(error = %e, "loading incoming changes' records failed; retried one by one");
                return Vec::new();
            }
        };
        for (i, (body, user_id)) in messages.iter().enumerate() {
            if let Err(e) = self.trusted(*user_id) {
                results.push(Some(Err(e)));
                continue;
            }
            // At most one apply per record in a batch: each apply is planned on the state the
            // one before it recorded.
            if let Some(record) = loaded.record_of(i)
                && !records.insert(record.clone())
            {
                break;
            }
            match self
                .prepare_in(&mut tx, &mut ranks, &mut writes, Some(&mut loaded), body)
                .await
            {
                Ok(Prepared::Done(p)) => results.push(Some(Ok(p))),
                Ok(Prepared::Apply(p)) => {
                    pending.push((results.len(), *p));
                    results.push(None);
                }
                Err(e @ IncomingError::Permanent { .. }) => results.push(Some(Err(e))),
                Err(IncomingError::Transient(e)) => {
                    // The transaction is rolled back: every message is processed alone.
                    debug!(error = %e, "preparing incoming changes failed; retried one by one");
                    return Vec::new();
                }
            }
        }
        if let Err(e) = Self::commit_prepared(tx, ranks, writes).await {
            debug!(error = %e, "recording incoming changes failed; retried one by one");
            return Vec::new();
        }
        let mut taken = results.len();
        if let Some(&(first, _)) = pending.first() {
            let changes: Vec<Apply> = pending.iter().map(|(_, p)| p.apply.clone()).collect();
            let applied = self.adapter.apply_batch(&changes).await;
            match self.finish_batch(pending, applied).await {
                Ok((finished, cut)) => {
                    taken = taken.min(cut);
                    for (i, r) in finished {
                        if let Some(slot) = results.get_mut(i) {
                            *slot = Some(r);
                        }
                    }
                }
                Err(e) => {
                    // Nothing recorded: the pending fields stay, and the changes applied are
                    // applied again (idempotently) when processed alone.
                    debug!(error = %e, "recording applied changes failed; retried one by one");
                    taken = taken.min(first);
                }
            }
        }
        results.truncate(taken);
        let results: Vec<_> = results.into_iter().map_while(|r| r).collect();
        for r in &results {
            Metrics::inc(&self.metrics.incoming);
            self.counted(r);
        }
        self.metrics.touch();
        results
    }

    /// Writes what a batch changed and commits its transaction.
    async fn commit_prepared(
        mut tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        ranks: RankCache,
        mut writes: store::Writes,
    ) -> Result<(), StoreError> {
        ranks.save(&mut tx).await?;
        writes.flush(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records, in one transaction, what became of the applies of a batch (`applied`, in the
    /// order of `pending`). Returns what became of each message recorded, by index, and the
    /// index of the first message that is not (a transient apply failure, or not attempted).
    async fn finish_batch(
        &mut self,
        pending: Vec<(usize, Pending)>,
        applied: Vec<Result<Applied, AdapterError>>,
    ) -> Result<(Vec<(usize, Result<Processed, IncomingError>)>, usize), StoreError> {
        let mut tx = self.store.begin().await?;
        let mut writes = store::Writes::default();
        let mut finished = Vec::with_capacity(pending.len());
        let mut cut = usize::MAX;
        let mut applied = applied.into_iter();
        for (i, p) in pending {
            let Some(r) = applied.next() else {
                cut = cut.min(i);
                break;
            };
            match self.finish_in(&mut writes, p, r) {
                Err(IncomingError::Transient(e)) => {
                    debug!(error = %e, "applying an incoming change failed; retried alone");
                    Metrics::inc(&self.metrics.retries);
                    cut = cut.min(i);
                }
                r => finished.push((i, r)),
            }
        }
        writes.flush(&mut tx).await?;
        tx.commit().await?;
        Ok((finished, cut))
    }

    /// Only the router decides what this system may receive: a message anyone else put in the
    /// inbox (hidden fields, forged ranks or clocks) is never applied.
    fn trusted(&self, user_id: Option<&str>) -> Result<(), IncomingError> {
        if user_id == Some(self.router_user.as_str()) {
            return Ok(());
        }
        Err(permanent(
            DeadLetterReason::UntrustedPublisher,
            format!(
                "published by {}, not by the router ({})",
                user_id.map_or_else(|| "an unknown user".to_owned(), |u| format!("{u:?}")),
                self.router_user
            ),
        ))
    }

    /// Counts what became of an incoming message.
    fn counted(&self, r: &Result<Processed, IncomingError>) {
        match r {
            Ok(Processed::Applied) => Metrics::inc(&self.metrics.incoming_applied),
            Ok(Processed::Duplicate) => Metrics::inc(&self.metrics.incoming_duplicate),
            Ok(Processed::Stale) => Metrics::inc(&self.metrics.incoming_stale),
            _ => {}
        }
        self.metrics.touch();
    }

    async fn incoming(&mut self, body: &[u8]) -> Result<Processed, IncomingError> {
        let mut tx = self.store.begin().await?;
        let mut ranks = RankCache::default();
        let mut writes = store::Writes::default();
        let prepared = self
            .prepare_in(&mut tx, &mut ranks, &mut writes, None, body)
            .await?;
        Self::commit_prepared(tx, ranks, writes).await?;
        match prepared {
            Prepared::Done(p) => Ok(p),
            Prepared::Apply(p) => {
                let r = self.adapter.apply(&p.apply).await;
                let mut writes = store::Writes::default();
                let r = self.finish_in(&mut writes, *p, r);
                let mut tx = self.store.begin().await?;
                writes.flush(&mut tx).await?;
                tx.commit().await?;
                r
            }
        }
    }

    /// Processes an inbox message up to the apply, in the store transaction `c`: what became of
    /// it, or what to apply (its fields recorded as pending when the plan says so). The ranks
    /// it changes are kept in `ranks` and what it writes in `writes`, written when the
    /// transaction is committed; what `loaded` holds of the event is taken from it instead of
    /// read from the store.
    async fn prepare_in(
        &mut self,
        c: &mut SqliteConnection,
        ranks: &mut RankCache,
        writes: &mut store::Writes,
        mut loaded: Option<&mut Preloaded>,
        body: &[u8],
    ) -> Result<Prepared, IncomingError> {
        if body.len() > self.max_message_bytes {
            return Err(permanent(
                DeadLetterReason::TooLarge,
                format!("{} bytes, limit {}", body.len(), self.max_message_bytes),
            ));
        }
        let ev = ChangeEvent::decode(body).map_err(|e| {
            permanent(
                DeadLetterReason::Undecodable,
                format!("not a concord.v1.ChangeEvent: {e}"),
            )
        })?;
        if ev.schema_version != concord_proto::SCHEMA_VERSION {
            return Err(permanent(
                DeadLetterReason::UnsupportedSchemaVersion,
                format!("schema_version {}", ev.schema_version),
            ));
        }
        if ev.event_id.is_empty() {
            return Err(permanent(
                DeadLetterReason::InvalidEventId,
                "empty event_id",
            ));
        }
        let seen_key = dedup_key(&ev);
        let seen = match loaded.as_deref_mut().and_then(|l| l.seen(&seen_key)) {
            Some(seen) => seen,
            None => store::is_seen(c, &seen_key).await?,
        };
        if seen {
            debug!(event_id = %ev.event_id, "duplicate event");
            return Ok(Prepared::Done(Processed::Duplicate));
        }
        let Some(message) = self.entities.get(&ev.entity).cloned() else {
            return Err(permanent(
                DeadLetterReason::UnknownEntity,
                format!(
                    "entity {:?} is not in the policy of system {}",
                    ev.entity, self.system
                ),
            ));
        };
        if ev.key.is_empty() {
            return Err(permanent(DeadLetterReason::InvalidKey, "empty key"));
        }
        let decoded = decode_copy(&ev, &message).map_err(|e| permanent(e.reason, e.detail))?;
        if !decoded.unknown.is_empty() {
            // Fields of a newer schema than this adapter's: the rest is applied.
            debug!(event_id = %ev.event_id, fields = ?decoded.unknown, "fields the local schema does not know: skipped");
        }
        if !decoded.without_clock.is_empty() {
            warn!(event_id = %ev.event_id, fields = ?decoded.without_clock, "fields without a clock: skipped");
        }
        let (entity, key) = (ev.entity.as_str(), ev.key.as_str());
        let before = match loaded.and_then(|l| l.take(entity, key)) {
            Some(before) => before,
            None => store::load_record(c, entity, key).await?,
        };
        let mut state = before.clone();
        let step = self.replica.incoming(
            &mut state,
            ranks.of(c, entity).await?,
            &decoded.copy,
            now_ms(),
        );
        let plan = match step {
            IncomingStep::Stale | IncomingStep::Recorded => {
                writes.record(entity, key, &before, &state);
                writes.seen(seen_key, now_ms());
                return Ok(Prepared::Done(if matches!(step, IncomingStep::Stale) {
                    Processed::Stale
                } else {
                    Processed::Recorded
                }));
            }
            IncomingStep::Apply(plan) => plan,
        };
        // A step recorded first leaves its fields pending: a crash before the apply is recorded
        // applies them again on redelivery. Otherwise (a delete) nothing is recorded until the
        // apply is, so a redelivery computes it again.
        let recorded = if plan.record_first {
            writes.record(entity, key, &before, &state);
            state.clone()
        } else {
            before.clone()
        };
        let origin = if ev.origin.is_empty() {
            &ev.source
        } else {
            &ev.origin
        };
        let apply = self.to_apply(entity, key, &plan, &message, &ev.event_id, origin);
        Ok(Prepared::Apply(Box::new(Pending {
            seen_key,
            before,
            recorded,
            state,
            plan,
            apply,
        })))
    }

    /// Records, in `writes`, what became of the apply of a prepared message.
    fn finish_in(
        &mut self,
        writes: &mut store::Writes,
        p: Pending,
        result: Result<Applied, AdapterError>,
    ) -> Result<Processed, IncomingError> {
        let Pending {
            seen_key,
            before,
            recorded,
            mut state,
            plan,
            apply,
        } = p;
        let (entity, key) = (apply.entity.as_str(), apply.key.as_str());
        match result {
            Ok(applied) => {
                self.replica.applied(
                    &mut state,
                    &plan,
                    &applied.local_id,
                    applied.version,
                    now_ms(),
                );
                writes.record(entity, key, &recorded, &state);
                writes.seen(seen_key, now_ms());
                Ok(Processed::Applied)
            }
            Err(AdapterError::Permanent(e)) => {
                // The system refused it: hold what it held again.
                if plan.record_first {
                    writes.record(entity, key, &recorded, &before);
                }
                Err(permanent(DeadLetterReason::ApplyFailed, e.to_string()))
            }
            // Pending fields stay: the retry applies them again.
            Err(e) => Err(IncomingError::Transient(e)),
        }
    }

    /// The [`Apply`] the system gets for `plan`.
    fn to_apply(
        &self,
        entity: &str,
        key: &str,
        plan: &ApplyPlan,
        message: &MessageDescriptor,
        event_id: &str,
        origin: &str,
    ) -> Apply {
        let fields = plan
            .fields
            .iter()
            .map(|(name, value)| (name.clone(), decoded(message, name, value.as_deref())))
            .collect();
        Apply {
            entity: entity.to_owned(),
            key: key.to_owned(),
            local_id: plan.local_id.clone(),
            op: plan.op,
            fields,
            event_id: event_id.to_owned(),
            origin: origin.to_owned(),
            message: message.clone(),
        }
    }

    /// Turns a batch of local changes (or snapshot items, published as `OP_SNAPSHOT`) into
    /// change events and commits, in ONE transaction, the events into the outbox together with
    /// the records' states, the id mapping and the cursor of the last change. Then publishes
    /// the outbox (see [`Engine::flush_outbox`]). If the commit fails, nothing is recorded and
    /// the batch can be processed again; once committed, the batch must not be processed again:
    /// its events are republished from the outbox, byte for byte.
    /// Returns the number of events the batch produced.
    pub(crate) async fn handle_local<L: Link>(
        &mut self,
        batch: &[LocalChange],
        snapshot: bool,
        link: &L,
    ) -> Result<usize, EngineError> {
        let n = self.stage_local(batch, snapshot).await?;
        self.flush_outbox(link).await?;
        Ok(n)
    }

    /// The first half of [`Engine::handle_local`]: commits the batch's events to the outbox (and
    /// writes back corrections). Publishes nothing. An error means nothing was committed.
    /// Returns the number of events staged.
    pub(crate) async fn stage_local(
        &mut self,
        batch: &[LocalChange],
        snapshot: bool,
    ) -> Result<usize, EngineError> {
        let mut tx = self.store.begin().await?;
        let mut staged = 0;
        let mut corrections = Vec::new();
        let mut cursor = None;
        let mut ranks: HashMap<String, Ranks> = HashMap::new();
        let mut known = KnownLocal::load(&mut tx, batch).await?;
        let mut writes = store::Writes::default();
        for ch in batch {
            Metrics::inc(&self.metrics.local_changes);
            if ch.cursor.is_some() {
                cursor.clone_from(&ch.cursor);
            }
            let Some(message) = self.entities.get(&ch.entity).cloned() else {
                let detail = format!("entity {:?} is not in the policy", ch.entity);
                self.park(
                    &mut writes,
                    ch,
                    None,
                    DeadLetterReason::UnknownEntity,
                    &detail,
                );
                continue;
            };
            let entity_ranks = match ranks.get(&ch.entity) {
                Some(r) => r.clone(),
                None => {
                    let r = store::load_ranks(&mut tx, &ch.entity).await?;
                    ranks.insert(ch.entity.clone(), r.clone());
                    r
                }
            };
            let (edit, problems) = self.edit(ch, &message, snapshot);
            let found = match known.get(&ch.entity, &ch.local_id) {
                Some(found) => found,
                None => {
                    writes.flush(&mut tx).await?;
                    store::load_record_by_local(&mut tx, &ch.entity, &ch.local_id).await?
                }
            };
            let (key, before) =
                found.unwrap_or_else(|| (uuid::Uuid::now_v7().to_string(), RecordState::default()));
            if let Some((reason, detail)) = problems {
                // The valid fields go on; the change is parked with what is wrong.
                self.park(&mut writes, ch, Some(&key), reason, &detail);
            }
            let mut state = before.clone();
            let now = now_ms();
            let resets = self.replica.clock_resets();
            let step = self.replica.local(&mut state, &entity_ranks, &edit, now);
            if self.replica.clock_resets() > resets {
                warn!(system = %self.system, "the clock was far ahead of the wall clock (beyond twice the router's skew): reset to the wall clock");
                Metrics::inc(&self.metrics.clock_resets);
            }
            self.count(&step);
            // A second change of a record in this batch: the first one's writes go first.
            if writes.has(&ch.entity, &key) {
                writes.flush(&mut tx).await?;
            }
            writes.record(&ch.entity, &key, &before, &state);
            if let Some(publish) = &step.publish {
                let event_id = uuid::Uuid::now_v7().to_string();
                let ev = change_event(
                    &self.system,
                    &ch.entity,
                    &key,
                    &message,
                    publish,
                    event_id,
                    now,
                );
                writes.publish(self.outgoing(&ev));
                staged += 1;
            }
            // The next change of the record in this batch starts from here.
            let mapped = state.local_id.as_deref() == Some(ch.local_id.as_str());
            known.put(
                &ch.entity,
                &ch.local_id,
                mapped.then(|| (key.clone(), state)),
            );
            if let Some(plan) = step.write_back {
                corrections.push((ch.entity.clone(), key, plan, message));
            }
        }
        writes.flush(&mut tx).await?;
        if !snapshot && let Some(c) = cursor {
            store::set_meta(&mut tx, store::CURSOR, &c).await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        self.metrics.touch();
        for (entity, key, plan, message) in corrections {
            // Committed already: a failure here must not make the caller process the batch
            // again.
            if let Err(e) = self.write_back(&entity, &key, &plan, &message).await {
                // The system keeps the overruled value until the owner's next write replaces it;
                // the failure is parked where an operator sees it.
                let detail = format!(
                    "could not write back the value of a higher-priority owner ({}): {e}",
                    plan.fields
                        .iter()
                        .map(|(f, _)| f.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let local_id = plan.local_id.clone().unwrap_or_default();
                let ch = LocalChange::upsert(entity.clone(), local_id, Default::default());
                let mut writes = store::Writes::default();
                self.park(
                    &mut writes,
                    &ch,
                    Some(&key),
                    DeadLetterReason::WriteBackFailed,
                    &detail,
                );
                let mut tx = self.store.begin().await?;
                writes.flush(&mut tx).await?;
                tx.commit().await.map_err(StoreError::from)?;
            }
        }
        Ok(staged)
    }

    /// A local change as the machine sees it: its values encoded. A field the entity does not
    /// have, or a value of the wrong type, is left out; what is wrong is returned, to park the
    /// change.
    fn edit(
        &self,
        ch: &LocalChange,
        message: &MessageDescriptor,
        snapshot: bool,
    ) -> (LocalEdit, Option<(DeadLetterReason, String)>) {
        let mut fields = Vec::with_capacity(ch.fields.len());
        let mut problems = Vec::new();
        let mut reason = DeadLetterReason::InvalidRecord;
        for (name, value) in &ch.fields {
            match encoded(message, name, value.as_ref()) {
                Ok(v) => fields.push((name.clone(), v)),
                Err(Invalid::UnknownField(e)) => {
                    reason = DeadLetterReason::UnknownField;
                    problems.push(e);
                }
                Err(Invalid::Value(e)) => problems.push(format!("field {name}: {e}")),
            }
        }
        let edit = LocalEdit {
            op: ch.op,
            local_id: ch.local_id.clone(),
            fields,
            version: ch.version,
            snapshot,
        };
        let problems = (!problems.is_empty()).then(|| (reason, problems.join("; ")));
        (edit, problems)
    }

    /// Parks a local change that cannot be published (in the batch's transaction): it goes to
    /// the system's dead-letter queue with the reason, and is counted and logged with its record.
    fn park(
        &self,
        writes: &mut store::Writes,
        ch: &LocalChange,
        key: Option<&str>,
        reason: DeadLetterReason,
        detail: &str,
    ) {
        warn!(system = %self.system, entity = %ch.entity, local_id = %ch.local_id, key = ?key,
            reason = reason.as_str(), %detail, "a local change cannot be published: parked in the dead-letter queue");
        Metrics::inc(&self.metrics.local_invalid);
        writes.park(parked(&self.system, ch, key, reason, detail));
    }

    fn count(&self, step: &LocalStep) {
        let m = &self.metrics;
        Metrics::add(&m.local_unchanged, u64::from(step.unchanged));
        Metrics::add(&m.local_echoes, u64::from(step.echoes));
        Metrics::add(&m.local_superseded, u64::from(step.superseded));
        Metrics::add(&m.local_overruled, u64::from(step.overruled));
    }

    /// Writes the values of higher-ranked owners back over a local edit, then records the
    /// echoes the write will cause.
    async fn write_back(
        &mut self,
        entity: &str,
        key: &str,
        plan: &ApplyPlan,
        message: &MessageDescriptor,
    ) -> Result<(), AdapterError> {
        let event_id = uuid::Uuid::now_v7().to_string();
        let apply = self.to_apply(entity, key, plan, message, &event_id, &self.system);
        let applied = self.adapter.apply(&apply).await?;
        Metrics::inc(&self.metrics.corrections);
        let mut tx = self.store.begin().await.map_err(AdapterError::transient)?;
        let before = store::load_record(&mut tx, entity, key)
            .await
            .map_err(AdapterError::transient)?;
        let mut state = before.clone();
        self.replica.applied(
            &mut state,
            plan,
            &applied.local_id,
            applied.version,
            now_ms(),
        );
        store::save_record(&mut tx, entity, key, &before, &state)
            .await
            .map_err(AdapterError::transient)?;
        tx.commit().await.map_err(AdapterError::transient)?;
        Ok(())
    }

    /// Publishes every outbox entry, in insertion order, with the bytes committed (same event
    /// ids, same stamps), and removes them once the broker confirmed them. Counts them as
    /// `published` only then. Returns the number published.
    pub(crate) async fn flush_outbox<L: Link>(&mut self, link: &L) -> Result<usize, EngineError> {
        let entries = self.store.outbox().await?;
        let Some((last, _)) = entries.last() else {
            self.confirm_cursor().await;
            return Ok(0);
        };
        let last = *last;
        let mut out = Vec::with_capacity(entries.len());
        for (_, entry) in entries {
            match entry {
                OutboxEntry::Publish(ev) => out.push(ev),
                OutboxEntry::Park(p) => {
                    link.dead_letter(&p.body, &p.reason, &p.detail).await?;
                    Metrics::inc(&self.metrics.dead_lettered);
                }
            }
        }
        link.publish(&out).await?;
        self.store.outbox_done(last).await?;
        Metrics::add(&self.metrics.published, out.len() as u64);
        self.metrics.touch();
        self.confirm_cursor().await;
        Ok(out.len())
    }

    /// Tells the adapter the feed position up to which every change is confirmed by the broker
    /// (the outbox is empty: everything committed with the persisted cursor is published).
    async fn confirm_cursor(&mut self) {
        let cursor = match self.store.cursor().await {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "reading the cursor");
                return;
            }
        };
        if self.confirmed.as_deref() == Some(cursor.as_str()) {
            return;
        }
        match self.adapter.published(&cursor).await {
            Ok(()) => self.confirmed = Some(cursor),
            // Told again after the next publish.
            Err(e) => {
                warn!(%cursor, error = %e, "the adapter could not take note of published changes")
            }
        }
    }

    fn outgoing(&self, ev: &ChangeEvent) -> Outgoing {
        Outgoing {
            routing_key: format!("{}.{}", self.system, ev.entity),
            body: ev.encode_to_vec(),
            event_id: ev.event_id.clone(),
            concord_key: format!("{}/{}", ev.entity, ev.key),
            user_id: self.publish_user_id.clone(),
            resync_target: None,
            control: None,
        }
    }
}

/// What identifies a processed copy for deduplication: its event id and the fields it carries.
/// A copy of the same event with other fields (the router routed it again after a policy change,
/// e.g. an event dead-lettered for an unknown field and replayed once the field is in the
/// policy) is processed: the stamps make whatever it repeats stale, and nothing it adds is lost.
/// What the store holds of the events of a batch and of their records, read with a few
/// statements for the whole batch instead of several per event.
#[derive(Default)]
struct Preloaded {
    /// Dedup keys looked up, and whether each was seen.
    seen: HashMap<String, bool>,
    /// (entity, key) looked up → the record's state (default when the store has none).
    records: HashMap<(String, String), RecordState>,
    /// The (entity, key) of each message of the batch, in order (`None`: it does not decode).
    record_of: Vec<Option<(String, String)>>,
}

impl Preloaded {
    /// Reads what the store holds of the events (that decode) in `messages`.
    async fn load(
        c: &mut SqliteConnection,
        messages: &[(&[u8], Option<&str>)],
    ) -> Result<Preloaded, StoreError> {
        let decoded: Vec<Option<ChangeEvent>> = messages
            .iter()
            .map(|(body, _)| ChangeEvent::decode(*body).ok())
            .collect();
        let record_of = decoded
            .iter()
            .map(|ev| ev.as_ref().map(|ev| (ev.entity.clone(), ev.key.clone())))
            .collect();
        let events: Vec<&ChangeEvent> = decoded.iter().flatten().collect();
        let dedup: Vec<String> = events.iter().map(|ev| dedup_key(ev)).collect();
        let ids: Vec<&str> = dedup.iter().map(String::as_str).collect();
        let seen = store::seen_among(c, &ids).await?;
        let mut loaded = Preloaded {
            seen: dedup
                .iter()
                .map(|k| (k.clone(), seen.contains(k)))
                .collect(),
            records: HashMap::new(),
            record_of,
        };
        let mut by_entity: HashMap<&str, Vec<&str>> = HashMap::new();
        for ev in &events {
            by_entity.entry(&ev.entity).or_default().push(&ev.key);
        }
        for (entity, keys) in by_entity {
            let mut states = store::load_records(c, entity, &keys).await?;
            for key in keys {
                // A key named twice gets the state once.
                if let Some(state) = states.remove(key) {
                    loaded
                        .records
                        .insert((entity.to_owned(), key.to_owned()), state);
                } else {
                    loaded
                        .records
                        .entry((entity.to_owned(), key.to_owned()))
                        .or_default();
                }
            }
        }
        Ok(loaded)
    }

    /// The (entity, key) of the batch's message `i`, if it decodes.
    fn record_of(&self, i: usize) -> Option<&(String, String)> {
        self.record_of.get(i).and_then(Option::as_ref)
    }

    /// Whether the event with dedup key `key` was seen, if looked up (once, like
    /// [`Preloaded::take`]).
    fn seen(&mut self, key: &str) -> Option<bool> {
        self.seen.remove(key)
    }

    /// The state of a record looked up (once: a second event of the same record reads the
    /// store, where the first one's writes are).
    fn take(&mut self, entity: &str, key: &str) -> Option<RecordState> {
        self.records.remove(&(entity.to_owned(), key.to_owned()))
    }
}

/// What the store holds of the records a batch of local changes concerns, read with a few
/// statements for the whole batch instead of several per change.
struct KnownLocal {
    /// (entity, local id) looked up → its canonical key and state, if the store has it.
    records: HashMap<(String, String), Option<(String, RecordState)>>,
}

impl KnownLocal {
    async fn load(
        c: &mut SqliteConnection,
        batch: &[LocalChange],
    ) -> Result<KnownLocal, StoreError> {
        let mut by_entity: HashMap<&str, Vec<&str>> = HashMap::new();
        for ch in batch {
            by_entity.entry(&ch.entity).or_default().push(&ch.local_id);
        }
        let mut records = HashMap::new();
        for (entity, local_ids) in by_entity {
            let mut found = store::load_records_by_local(c, entity, &local_ids).await?;
            for local_id in local_ids {
                // A local id named twice gets the record once.
                let entry = records.entry((entity.to_owned(), local_id.to_owned()));
                match found.remove(local_id) {
                    Some(f) => {
                        entry.insert_entry(Some(f));
                    }
                    None => {
                        entry.or_insert(None);
                    }
                }
            }
        }
        Ok(KnownLocal { records })
    }

    /// The key and state of the record known as `local_id` (`Some(None)`: none), if looked up.
    #[allow(clippy::option_option)]
    fn get(&self, entity: &str, local_id: &str) -> Option<Option<(String, RecordState)>> {
        self.records
            .get(&(entity.to_owned(), local_id.to_owned()))
            .cloned()
    }

    /// What the store now holds of the record known as `local_id`.
    fn put(&mut self, entity: &str, local_id: &str, found: Option<(String, RecordState)>) {
        self.records
            .insert((entity.to_owned(), local_id.to_owned()), found);
    }
}

/// The merge ranks of the entities a store transaction touched: loaded once each, written
/// (what changed) before it commits.
#[derive(Default)]
struct RankCache {
    /// Entity → (ranks as loaded, ranks now).
    entities: HashMap<String, (Ranks, Ranks)>,
}

impl RankCache {
    /// The ranks of `entity`, loaded from `c` the first time.
    async fn of(
        &mut self,
        c: &mut SqliteConnection,
        entity: &str,
    ) -> Result<&mut Ranks, StoreError> {
        use std::collections::hash_map::Entry;
        Ok(match self.entities.entry(entity.to_owned()) {
            Entry::Occupied(o) => &mut o.into_mut().1,
            Entry::Vacant(v) => {
                let loaded = store::load_ranks(c, entity).await?;
                &mut v.insert((loaded.clone(), loaded)).1
            }
        })
    }

    /// Writes the ranks that changed.
    async fn save(self, c: &mut SqliteConnection) -> Result<(), StoreError> {
        for (entity, (before, now)) in &self.entities {
            store::save_ranks(c, entity, before, now).await?;
        }
        Ok(())
    }
}

fn dedup_key(ev: &ChangeEvent) -> String {
    // FNV-1a over the op and the sorted mask.
    let mut names: Vec<&str> = ev.field_mask.iter().map(String::as_str).collect();
    names.sort_unstable();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ev
        .op
        .to_le_bytes()
        .iter()
        .chain(names.join("\0").as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{}#{h:016x}", ev.event_id)
}

/// A stored field value (see `route::encode_field`) as the system receives it.
fn decoded(
    message: &MessageDescriptor,
    name: &str,
    value: Option<&[u8]>,
) -> Option<prost_reflect::Value> {
    let fd = message.get_field_by_name(name)?;
    decode_field(message, &fd, value?)
}

/// Why a local field value cannot be published.
enum Invalid {
    UnknownField(String),
    Value(String),
}

/// A field value as the replica stores it; an error names what is wrong.
fn encoded(
    message: &MessageDescriptor,
    name: &str,
    value: Option<&prost_reflect::Value>,
) -> Result<Value, Invalid> {
    let Some(fd) = message.get_field_by_name(name) else {
        return Err(Invalid::UnknownField(format!(
            "{} has no field {name:?}",
            message.full_name()
        )));
    };
    let Some(v) = value else {
        return Ok(None);
    };
    let mut one = DynamicMessage::new(message.clone());
    one.try_set_field(&fd, v.clone())
        .map_err(|e| Invalid::Value(e.to_string()))?;
    Ok(encode_field(&one, &fd))
}

/// A parked local change: what it was, as JSON, with what is wrong.
fn parked(
    system: &str,
    ch: &LocalChange,
    key: Option<&str>,
    reason: DeadLetterReason,
    detail: &str,
) -> Parked {
    let fields: serde_json::Map<String, serde_json::Value> = ch
        .fields
        .iter()
        .map(|(name, v)| {
            let shown = match v {
                None => serde_json::Value::Null,
                Some(v) => serde_json::Value::String(format!("{v:?}")),
            };
            (name.clone(), shown)
        })
        .collect();
    let body = serde_json::json!({
        "system": system,
        "entity": ch.entity,
        "local_id": ch.local_id,
        "key": key,
        "op": format!("{:?}", ch.op),
        "fields": fields,
        "reason": reason.as_str(),
        "detail": detail,
    });
    Parked {
        body: body.to_string().into_bytes(),
        reason: reason.as_str().to_owned(),
        detail: detail.to_owned(),
    }
}
