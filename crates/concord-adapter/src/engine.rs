//! The engine: the shell around the pure replica logic of `concord-policy`, shared by the AMQP
//! runner and the in-memory test bus. It turns local changes into change events and incoming
//! change events into [`Apply`] calls, keeping the state store consistent with what was
//! published and applied.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use concord_policy::replica::{
    FieldState, Held, LocalWrite, buried, classify_local, delete_is_new,
};
use concord_policy::route::{decode_field, encode_field};
use concord_policy::{Hlc, Op, Policy, Stamp};
use concord_proto::v1::{ChangeEvent, FieldClock};
use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, MessageDescriptor};
use sqlx::SqliteConnection;
use tracing::{debug, warn};

use crate::adapter::{AdapterError, Apply, ApplyOp, Fields, LocalChange, LocalOp, SystemAdapter};
use crate::metrics::Metrics;
use crate::store::{self, Store, StoreError};
use crate::transport::{Link, Outgoing, TransportError};

/// The wall clock in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why the engine could not be set up or could not process local changes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// An entity names a protobuf message that is not among the canonical messages.
    #[error("entity {entity:?}: unknown protobuf message {message:?}")]
    UnknownMessage { entity: String, message: String },
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
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IncomingError {
    /// It can never be processed: dead-letter it (`reason` goes into header `concord-reason`).
    #[error("{reason}: {detail}")]
    Permanent {
        reason: &'static str,
        detail: String,
    },
    /// Retry it later, in order.
    #[error("transient: {0}")]
    Transient(String),
}

impl From<StoreError> for IncomingError {
    fn from(e: StoreError) -> Self {
        IncomingError::Transient(e.to_string())
    }
}

fn permanent(reason: &'static str, detail: impl Into<String>) -> IncomingError {
    IncomingError::Permanent {
        reason,
        detail: detail.into(),
    }
}

/// A winning incoming field, with what it replaces.
struct Winner {
    name: String,
    new: FieldState,
    /// What the replica kept of the field before (restored if the system refuses the change).
    old: Held,
}

/// What a delete leaves of a record in the replica.
struct Buried {
    /// Whether no field keeps a write made after the delete.
    remove_record: bool,
    /// The fields whose state changed, with what each keeps now.
    changed: Vec<(String, Held)>,
    /// The fields whose shown value changed, with that value (encoded; `None` = cleared).
    shown: Vec<(String, Option<Vec<u8>>)>,
}

impl Default for Buried {
    fn default() -> Self {
        Buried {
            remove_record: true,
            changed: Vec::new(),
            shown: Vec::new(),
        }
    }
}

/// A stored field value (see `route::encode_field`) as the system receives it.
fn decoded(
    desc: &MessageDescriptor,
    name: &str,
    value: Option<&[u8]>,
) -> Option<prost_reflect::Value> {
    let fd = desc.get_field_by_name(name)?;
    decode_field(desc, &fd, value?)
}

/// The engine of one system.
#[derive(Debug)]
pub(crate) struct Engine<A> {
    system: String,
    adapter: Arc<A>,
    store: Store,
    hlc: Hlc,
    entities: HashMap<String, MessageDescriptor>,
    metrics: Arc<Metrics>,
    publish_user_id: bool,
}

impl<A: SystemAdapter> Engine<A> {
    pub(crate) async fn new(
        system: &str,
        adapter: Arc<A>,
        store: Store,
        policy: &Policy,
        metrics: Arc<Metrics>,
        publish_user_id: bool,
    ) -> Result<Engine<A>, EngineError> {
        // The entities and their messages come from the policy (and the schema it names).
        let resolved = policy
            .entities()
            .iter()
            .map(|e| (e.name.clone(), e.message.clone()))
            .collect();
        let hlc = Hlc::starting_at(store.max_hlc().await?);
        Ok(Engine {
            system: system.to_owned(),
            adapter,
            store,
            hlc,
            entities: resolved,
            metrics,
            publish_user_id,
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

    /// Processes one inbox message. Idempotent: processing the same message again (after a
    /// transient failure or a redelivery) is safe.
    pub(crate) async fn handle_incoming(
        &mut self,
        body: &[u8],
    ) -> Result<Processed, IncomingError> {
        Metrics::inc(&self.metrics.incoming);
        let r = self.incoming(body).await;
        match &r {
            Ok(Processed::Applied) => Metrics::inc(&self.metrics.incoming_applied),
            Ok(Processed::Duplicate) => Metrics::inc(&self.metrics.incoming_duplicate),
            Ok(Processed::Stale) => Metrics::inc(&self.metrics.incoming_stale),
            _ => {}
        }
        self.metrics.touch();
        r
    }

    async fn incoming(&mut self, body: &[u8]) -> Result<Processed, IncomingError> {
        let ev = ChangeEvent::decode(body)
            .map_err(|e| permanent("undecodable", format!("not a concord.v1.ChangeEvent: {e}")))?;
        if ev.schema_version != concord_proto::SCHEMA_VERSION {
            return Err(permanent(
                "unsupported_schema_version",
                format!("schema_version {}", ev.schema_version),
            ));
        }
        if ev.event_id.is_empty() {
            return Err(permanent("invalid_event_id", "empty event_id"));
        }
        if self.store.seen(&ev.event_id).await? {
            debug!(event_id = %ev.event_id, "duplicate event");
            return Ok(Processed::Duplicate);
        }
        let Some(desc) = self.entities.get(&ev.entity).cloned() else {
            return Err(permanent(
                "unknown_entity",
                format!(
                    "entity {:?} is not configured for system {}",
                    ev.entity, self.system
                ),
            ));
        };
        if ev.key.is_empty() {
            return Err(permanent("invalid_key", "empty key"));
        }
        let op =
            Op::from_wire(ev.op).ok_or_else(|| permanent("invalid_op", format!("op {}", ev.op)))?;
        for c in ev.clocks.values().chain(ev.record_clock.as_ref()) {
            self.hlc.observe(c.hlc);
        }
        let origin = if ev.origin.is_empty() {
            &ev.source
        } else {
            &ev.origin
        }
        .clone();
        let mut tx = self.store.begin().await?;
        // The router lists the receiver's non-zero ranks; a field of the mask without an entry
        // has rank 0 (this system does not own it, or no longer does).
        for field in &ev.field_mask {
            let rank = ev.receiver_ranks.get(field).copied().unwrap_or(0);
            store::set_rank(&mut tx, &ev.entity, field, rank).await?;
        }
        let rec = store::record_by_key(&mut tx, &ev.entity, &ev.key).await?;
        let live_id = rec
            .as_ref()
            .filter(|r| r.live)
            .and_then(|r| r.local_id.clone());

        if op == Op::Delete {
            let tombstone = rec.and_then(|r| r.tombstone);
            return self
                .incoming_delete(tx, &ev, tombstone, live_id, origin, &desc)
                .await;
        }

        let record = DynamicMessage::decode(desc.clone(), ev.record.as_slice()).map_err(|e| {
            permanent(
                "invalid_record",
                format!("record is not a valid {}: {e}", desc.full_name()),
            )
        })?;
        let tomb = rec.as_ref().and_then(|r| r.tombstone.clone());
        let mut winners: Vec<Winner> = Vec::new();
        let mut fields = Fields::new();
        for name in &ev.field_mask {
            let Some(fd) = desc.get_field_by_name(name) else {
                warn!(event_id = %ev.event_id, field = %name, "ignoring unknown field");
                continue;
            };
            let Some(clock) = ev.clocks.get(name) else {
                warn!(event_id = %ev.event_id, field = %name, "ignoring field without clock");
                continue;
            };
            if buried(
                clock.hlc,
                &clock.system,
                tomb.as_ref().map(|(h, s)| (*h, s.as_str())),
            ) {
                continue; // written before the record's delete
            }
            let stamp = Stamp::new(clock.rank, clock.hlc, clock.system.clone());
            let mut held = store::held(&mut tx, &ev.entity, &ev.key, name).await?;
            let old = held.clone();
            let own_rank = store::get_rank(&mut tx, &ev.entity, name).await?;
            let new = FieldState {
                value: encode_field(&record, &fd),
                stamp,
                pending: true,
            };
            // A losing write may still be kept below the winner (a delete can bring it back).
            let won = held.receive(new.clone(), &self.system, own_rank);
            store::keep(&mut tx, &ev.entity, &ev.key, name, &held, Some(&old)).await?;
            if won {
                let value = record
                    .has_field(&fd)
                    .then(|| record.get_field(&fd).into_owned());
                fields.insert(name.clone(), value);
                winners.push(Winner {
                    name: name.clone(),
                    new,
                    old,
                });
            }
        }
        if winners.is_empty() {
            store::mark_seen(&mut tx, &ev.event_id, now_ms()).await?;
            tx.commit().await.map_err(StoreError::from)?;
            return Ok(Processed::Stale);
        }
        tx.commit().await.map_err(StoreError::from)?;
        let apply = Apply {
            entity: ev.entity.clone(),
            key: ev.key.clone(),
            local_id: live_id,
            op: ApplyOp::Upsert,
            fields,
            event_id: ev.event_id.clone(),
            origin,
        };
        match self.adapter.apply(&apply).await {
            Ok(applied) => {
                let mut tx = self.store.begin().await?;
                let now = now_ms();
                for w in &winners {
                    store::clear_pending(&mut tx, &ev.entity, &ev.key, &w.name, &w.new.stamp)
                        .await?;
                    store::expect_echo(
                        &mut tx,
                        &ev.entity,
                        &ev.key,
                        &w.name,
                        w.new.value.as_deref(),
                        now,
                    )
                    .await?;
                }
                store::map_record(&mut tx, &ev.entity, &ev.key, &applied.local_id).await?;
                store::mark_seen(&mut tx, &ev.event_id, now).await?;
                tx.commit().await.map_err(StoreError::from)?;
                Ok(Processed::Applied)
            }
            Err(AdapterError::Permanent(e)) => {
                // The system refused it: hold what it holds again.
                let mut tx = self.store.begin().await?;
                for w in &winners {
                    store::keep(&mut tx, &ev.entity, &ev.key, &w.name, &w.old, None).await?;
                }
                tx.commit().await.map_err(StoreError::from)?;
                Err(permanent("apply_failed", e))
            }
            // Pending fields stay: the retry applies them again.
            Err(e) => Err(IncomingError::Transient(e.to_string())),
        }
    }

    /// A routed delete: every field drops the writes made before it and the greatest later
    /// write (if any) wins; the record goes only if no field keeps one. Applies that to the
    /// system (a delete of the record, or the fields' new values), then records it.
    async fn incoming_delete(
        &mut self,
        mut tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        ev: &ChangeEvent,
        tombstone: Option<(u64, String)>,
        live_id: Option<String>,
        origin: String,
        desc: &MessageDescriptor,
    ) -> Result<Processed, IncomingError> {
        let Some(rc) = ev.record_clock.as_ref() else {
            return Err(permanent("missing_clock", "a delete needs record_clock"));
        };
        let delete = (rc.hlc, rc.system.as_str());
        if !delete_is_new(tombstone.as_ref().map(|(h, s)| (*h, s.as_str())), delete) {
            store::mark_seen(&mut tx, &ev.event_id, now_ms()).await?;
            tx.commit().await.map_err(StoreError::from)?;
            return Ok(Processed::Stale);
        }
        let mut buried = Buried::default();
        for name in store::field_names_of(&mut tx, &ev.entity, &ev.key).await? {
            let mut held = store::held(&mut tx, &ev.entity, &ev.key, &name).await?;
            let before = held.clone();
            let own_rank = store::get_rank(&mut tx, &ev.entity, &name).await?;
            if held.bury(delete, &self.system, own_rank) {
                let value = held.winner.as_ref().and_then(|w| w.value.clone());
                if value.is_some() || before.winner.as_ref().is_some_and(|w| w.value.is_some()) {
                    buried.shown.push((name.clone(), value));
                }
            }
            buried.remove_record &= held.winner.is_none();
            if held != before {
                buried.changed.push((name, held));
            }
        }
        let (local_id, op) = match live_id {
            Some(id) if buried.remove_record => (id, ApplyOp::Delete),
            Some(id) if !buried.shown.is_empty() => (id, ApplyOp::Upsert),
            _ => {
                self.bury(&mut tx, ev, rc, &buried, false).await?;
                tx.commit().await.map_err(StoreError::from)?;
                return Ok(Processed::Recorded);
            }
        };
        tx.commit().await.map_err(StoreError::from)?;
        let upsert = op == ApplyOp::Upsert;
        let fields = if upsert {
            buried
                .shown
                .iter()
                .map(|(name, value)| (name.clone(), decoded(desc, name, value.as_deref())))
                .collect()
        } else {
            Fields::new()
        };
        let apply = Apply {
            entity: ev.entity.clone(),
            key: ev.key.clone(),
            local_id: Some(local_id),
            op,
            fields,
            event_id: ev.event_id.clone(),
            origin,
        };
        match self.adapter.apply(&apply).await {
            Ok(_) => {
                let mut tx = self.store.begin().await?;
                self.bury(&mut tx, ev, rc, &buried, upsert).await?;
                tx.commit().await.map_err(StoreError::from)?;
                Ok(Processed::Applied)
            }
            Err(AdapterError::Permanent(e)) => Err(permanent("apply_failed", e)),
            Err(e) => Err(IncomingError::Transient(e.to_string())),
        }
    }

    /// Records a delete: the tombstone, what each field keeps now, the record gone too unless
    /// later writes keep it, and the event seen. With `echoes`, the values the system now shows
    /// (it was sent them) are expected back as its local changes.
    async fn bury(
        &self,
        tx: &mut SqliteConnection,
        ev: &ChangeEvent,
        rc: &FieldClock,
        buried: &Buried,
        echoes: bool,
    ) -> Result<(), StoreError> {
        let stamp = (rc.hlc, rc.system.as_str());
        store::set_tombstone(tx, &ev.entity, &ev.key, stamp, buried.remove_record).await?;
        for (name, held) in &buried.changed {
            store::keep(tx, &ev.entity, &ev.key, name, held, None).await?;
        }
        let now = now_ms();
        if echoes {
            for (name, value) in &buried.shown {
                store::expect_echo(tx, &ev.entity, &ev.key, name, value.as_deref(), now).await?;
            }
        }
        store::mark_seen(tx, &ev.event_id, now).await
    }

    /// Turns a batch of local changes (or snapshot items, published as `OP_SNAPSHOT`) into
    /// change events and commits, in ONE transaction, the events into the outbox together with
    /// the field states and stamps, the HLC, the id mapping and the cursor of the last change.
    /// Then publishes the outbox (see [`Engine::flush_outbox`]). If the commit fails, nothing is
    /// recorded and the batch can be processed again; once committed, the batch must not be
    /// processed again: its events are republished from the outbox, byte for byte.
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
        let mut out = Vec::new();
        let mut corrections = Vec::new();
        let mut cursor = None;
        for ch in batch {
            Metrics::inc(&self.metrics.local_changes);
            if ch.cursor.is_some() {
                cursor.clone_from(&ch.cursor);
            }
            self.prepare_local(&mut tx, ch, snapshot, &mut out, &mut corrections)
                .await?;
        }
        for ev in &out {
            store::push_outbox(&mut tx, ev).await?;
        }
        if !snapshot && let Some(c) = cursor {
            store::set_meta(&mut tx, store::CURSOR, &c).await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        self.metrics.touch();
        for c in corrections {
            match self.adapter.apply(&c).await {
                Ok(_) => {
                    Metrics::inc(&self.metrics.corrections);
                    // Committed already: a failure here must not make the caller process the
                    // batch again.
                    if let Err(e) = self.expect_echoes(&c).await {
                        warn!(entity = %c.entity, key = %c.key, error = %e,
                            "could not record the echoes of a correction");
                    }
                }
                Err(e) => warn!(entity = %c.entity, key = %c.key, error = %e,
                    "could not write back the value of a higher-priority owner"),
            }
        }
        Ok(out.len())
    }

    /// Publishes every outbox entry, in insertion order, with the bytes committed (same event
    /// ids, same stamps), and removes them once the broker confirmed them. Counts them as
    /// `published` only then. Returns the number published.
    pub(crate) async fn flush_outbox<L: Link>(&mut self, link: &L) -> Result<usize, EngineError> {
        let entries = self.store.outbox().await?;
        let Some((last, _)) = entries.last() else {
            return Ok(0);
        };
        let last = *last;
        let out: Vec<Outgoing> = entries.into_iter().map(|(_, ev)| ev).collect();
        link.publish(&out).await?;
        self.store.outbox_done(last).await?;
        Metrics::add(&self.metrics.published, out.len() as u64);
        self.metrics.touch();
        Ok(out.len())
    }

    /// Records the echoes a correction will cause.
    async fn expect_echoes(&mut self, a: &Apply) -> Result<(), StoreError> {
        let Some(desc) = self.entities.get(&a.entity) else {
            return Ok(());
        };
        let mut tx = self.store.begin().await?;
        let now = now_ms();
        for (name, value) in &a.fields {
            let Some(fd) = desc.get_field_by_name(name) else {
                continue;
            };
            let encoded = match value {
                Some(v) => single(desc, &fd, v)
                    .ok()
                    .and_then(|one| encode_field(&one, &fd)),
                None => None,
            };
            store::expect_echo(&mut tx, &a.entity, &a.key, name, encoded.as_deref(), now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn prepare_local(
        &mut self,
        c: &mut SqliteConnection,
        ch: &LocalChange,
        snapshot: bool,
        out: &mut Vec<Outgoing>,
        corrections: &mut Vec<Apply>,
    ) -> Result<(), StoreError> {
        let Some(desc) = self.entities.get(&ch.entity).cloned() else {
            warn!(entity = %ch.entity, local_id = %ch.local_id, "local change of an unconfigured entity: skipped");
            Metrics::inc(&self.metrics.local_invalid);
            return Ok(());
        };
        let entity = ch.entity.as_str();
        let rec = store::record_by_local(c, entity, &ch.local_id).await?;
        let now = now_ms();
        if ch.op == LocalOp::Delete {
            let Some(rec) = rec else {
                debug!(entity, local_id = %ch.local_id, "delete of a record never published: nothing to do");
                return Ok(());
            };
            if !rec.live {
                Metrics::inc(&self.metrics.local_unchanged);
                return Ok(());
            }
            let hlc = self.hlc.tick(now);
            store::set_tombstone(c, entity, &rec.key, (hlc, &self.system), true).await?;
            // Every stored field was written before this delete (the clock just ticked past
            // all of them): the replica forgets them, as every receiver of the delete does.
            store::delete_fields_of(c, entity, &rec.key).await?;
            let clock = FieldClock {
                hlc,
                system: self.system.clone(),
                rank: 0,
            };
            out.push(self.event(
                entity,
                &rec.key,
                Op::Delete,
                Vec::new(),
                Vec::new(),
                BTreeMap::new(),
                Some(clock),
                now,
            ));
            return Ok(());
        }
        let (key, is_new) = match &rec {
            Some(r) => (r.key.clone(), false),
            None => (uuid::Uuid::now_v7().to_string(), true),
        };
        if rec.as_ref().is_none_or(|r| !r.live) {
            store::map_record(c, entity, &key, &ch.local_id).await?;
        }
        let mut record = DynamicMessage::new(desc.clone());
        let mut mask = Vec::new();
        let mut clocks = BTreeMap::new();
        let mut overruled = Fields::new();
        let mut hlc = None;
        for (name, value) in &ch.fields {
            let Some(fd) = desc.get_field_by_name(name) else {
                warn!(entity, field = %name, "local change names an unknown field: skipped");
                Metrics::inc(&self.metrics.local_invalid);
                continue;
            };
            let encoded = match value {
                None => None,
                Some(v) => match single(&desc, &fd, v) {
                    Ok(one) => encode_field(&one, &fd),
                    Err(e) => {
                        warn!(entity, field = %name, error = %e, "local change has a value of the wrong type: skipped");
                        Metrics::inc(&self.metrics.local_invalid);
                        continue;
                    }
                },
            };
            if !is_new && store::take_echo(c, entity, &key, name, encoded.as_deref()).await? {
                // A late echo of a value applied here, possibly overtaken by a newer one.
                Metrics::inc(&self.metrics.local_unchanged);
                continue;
            }
            let stored = store::get_field(c, entity, &key, name).await?;
            let own_rank = store::get_rank(c, entity, name).await?;
            match classify_local(stored.as_ref(), encoded.as_deref(), &self.system, own_rank) {
                LocalWrite::Unchanged => Metrics::inc(&self.metrics.local_unchanged),
                LocalWrite::Overruled => {
                    Metrics::inc(&self.metrics.local_overruled);
                    let held = stored
                        .and_then(|s| s.value)
                        .and_then(|b| decode_field(&desc, &fd, &b));
                    overruled.insert(name.clone(), held);
                }
                LocalWrite::Publish => {
                    let h = *hlc.get_or_insert_with(|| self.hlc.tick(now));
                    let state = FieldState {
                        value: encoded,
                        stamp: Stamp::new(own_rank, h, self.system.clone()),
                        pending: false,
                    };
                    // A local write is the newest: nothing below it can come back.
                    let mut held = Held::default();
                    held.local(state);
                    store::keep(c, entity, &key, name, &held, None).await?;
                    store::clear_echoes(c, entity, &key, name).await?;
                    if let Some(v) = value {
                        // Checked by `single` above.
                        let _ = record.try_set_field(&fd, v.clone());
                    }
                    mask.push(name.clone());
                    clocks.insert(
                        name.clone(),
                        FieldClock {
                            hlc: h,
                            system: self.system.clone(),
                            rank: own_rank,
                        },
                    );
                }
            }
        }
        if !overruled.is_empty() {
            corrections.push(Apply {
                entity: entity.to_owned(),
                key: key.clone(),
                local_id: Some(ch.local_id.clone()),
                op: ApplyOp::Upsert,
                fields: overruled,
                event_id: uuid::Uuid::now_v7().to_string(),
                origin: self.system.clone(),
            });
        }
        if mask.is_empty() {
            return Ok(());
        }
        // OP_CREATE only for a record new to Concord: the echo of a record created by `apply`
        // is an update (the system may not be allowed to create records).
        let op = match ch.op {
            _ if snapshot => Op::Snapshot,
            LocalOp::Create if is_new => Op::Create,
            _ => Op::Upsert,
        };
        out.push(self.event(
            entity,
            &key,
            op,
            record.encode_to_vec(),
            mask,
            clocks,
            None,
            now,
        ));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        entity: &str,
        key: &str,
        op: Op,
        record: Vec<u8>,
        field_mask: Vec<String>,
        clocks: BTreeMap<String, FieldClock>,
        record_clock: Option<FieldClock>,
        now: u64,
    ) -> Outgoing {
        let event_id = uuid::Uuid::now_v7().to_string();
        let ev = ChangeEvent {
            event_id: event_id.clone(),
            source: self.system.clone(),
            entity: entity.to_owned(),
            key: key.to_owned(),
            op: op.to_wire() as i32,
            record,
            field_mask,
            clocks,
            derived_from: String::new(),
            schema_version: concord_proto::SCHEMA_VERSION,
            origin: String::new(),
            observed_at_ms: now,
            record_clock,
            receiver_ranks: BTreeMap::new(),
        };
        Outgoing {
            routing_key: format!("{}.{entity}", self.system),
            body: ev.encode_to_vec(),
            event_id,
            concord_key: format!("{entity}/{key}"),
            user_id: self.publish_user_id.then(|| self.system.clone()),
        }
    }
}

/// A message of type `desc` with only `fd` set to `v`.
fn single(
    desc: &MessageDescriptor,
    fd: &FieldDescriptor,
    v: &prost_reflect::Value,
) -> Result<DynamicMessage, prost_reflect::SetFieldError> {
    let mut one = DynamicMessage::new(desc.clone());
    one.try_set_field(fd, v.clone())?;
    Ok(one)
}
