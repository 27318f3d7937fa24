//! The adapter's rules for one system, as one state machine over the state of one record at a
//! time: [`Replica`]. Local changes go in and come out as what to publish, what to write back to
//! the system and which echoes to expect; routed copies go in and come out as what to apply and
//! what to keep. The adapter SDK's engine loads a record's [`RecordState`], runs one step, and
//! performs the step's effects (the state store write, the publish, the apply); the convergence
//! simulation and the in-memory test kit run the very same steps.
//!
//! Values are the encoded form of one field (see [`crate::value::encode_field`]), so the machine
//! needs no descriptors; [`change_event`] turns a [`Publish`] into the envelope.

use std::collections::BTreeMap;

use concord_proto::v1::{ChangeEvent, FieldClock};
use prost_reflect::MessageDescriptor;

use super::{FieldState, Held, LocalWrite, classify_local, delete_is_new, predates};
use crate::Op;
use crate::clock::{Hlc, LOGICAL_BITS, Stamp, from_ms};
use crate::route::DeadLetterReason;

/// The encoded value of one field (a message of the entity's type with only that field set);
/// `None` when the field is cleared.
pub type Value = Option<Vec<u8>>;

/// The stamp of a delete: its record clock and the system that deleted.
pub type DeleteStamp = (u64, String);

/// This system's merge rank per field of one entity, as the router last told it (absent = 0).
pub type Ranks = BTreeMap<String, u32>;

/// How the system's change feed treats the adapter's own writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Echoes {
    /// The feed reports them like any other change. They are recognised exactly when `apply`
    /// returns the record's version after the write (a row version, a log position: any number
    /// that grows with every change of the record) and the feed reports each change with the
    /// record's version; otherwise by value (the fallback, see [`Echo::Value`] for its limits).
    #[default]
    Reported,
    /// The feed never reports them (e.g. capture triggers that skip the adapter's own
    /// transactions): every reported change is a user's, nothing is expected. The feed should
    /// then report the record's current values (read when the change is reported), so that a
    /// user's edit an apply overwrote before the feed reported it reads as unchanged.
    NotReported,
}

/// A report of the adapter's own write that the change feed is expected to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Echo {
    /// Exact: the write made the record's version `version`, and `fields` hold the values the
    /// adapter wrote. A report with that version is the echo; a report with an older version
    /// describes values the write replaced (its `fields` are skipped as superseded); a newer
    /// version means the write was reported already or coalesced into this report (a field
    /// reported with the value the write gave it is then its echo: the system shows what the
    /// adapter wrote).
    /// For a delete, `deleted` is set (and `fields` empty): a report older than it describes
    /// a record the delete removed.
    Version {
        version: u64,
        fields: Vec<(String, Value)>,
        deleted: bool,
        at_ms: u64,
    },
    /// The fallback, by value: the feed will report `field = value`. Until the echo window
    /// passes, a reported change equal to it is taken for the echo, even after newer values
    /// were applied (feeds lag). Its limit: a feed that coalesces changes (a poller seeing only
    /// the latest state) may never report the adapter's write, and a user who sets the field to
    /// that value within the window loses the edit (it is taken for the echo). Versions, or
    /// [`Echoes::NotReported`], avoid that.
    Value {
        field: String,
        value: Value,
        at_ms: u64,
    },
}

impl Echo {
    fn at_ms(&self) -> u64 {
        match self {
            Echo::Version { at_ms, .. } | Echo::Value { at_ms, .. } => *at_ms,
        }
    }
}

/// Everything a replica keeps about one record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordState {
    /// The replica has seen the record before (it published or received something for it).
    pub known: bool,
    /// The record's id in the system.
    pub local_id: Option<String>,
    /// The record exists in the system.
    pub live: bool,
    /// The newest delete of the record.
    pub tombstone: Option<DeleteStamp>,
    /// Per field, the winning write and the writes a delete can bring back.
    pub fields: BTreeMap<String, Held>,
    /// Reports of the adapter's own writes the feed is expected to make, oldest first.
    pub echoes: Vec<Echo>,
}

impl RecordState {
    /// The stored value of a field.
    pub fn value(&self, field: &str) -> Option<&Value> {
        self.fields
            .get(field)
            .and_then(|h| h.winner.as_ref())
            .map(|w| &w.value)
    }

    fn delete_stamp(&self) -> Option<(u64, &str)> {
        self.tombstone.as_ref().map(|(h, s)| (*h, s.as_str()))
    }

    fn live_id(&self) -> Option<String> {
        self.local_id.clone().filter(|_| self.live)
    }

    /// The record existed in the system before (it was created there, or a delete of it was
    /// received).
    pub fn existed(&self) -> bool {
        self.local_id.is_some() || self.tombstone.is_some()
    }
}

/// What the system reports happened to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalOp {
    /// Fields changed (or the record appeared).
    Upsert,
    /// The record was created in the system.
    Create,
    /// The record was deleted.
    Delete,
}

/// One change of one record, as the system's feed (or a snapshot) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEdit {
    pub op: LocalOp,
    /// The record's id in the system.
    pub local_id: String,
    /// The reported fields and their values (unchanged ones are fine).
    pub fields: Vec<(String, Value)>,
    /// The record's version after this change, if the feed reports one (see [`Echoes`]): it
    /// recognises the echoes of the adapter's own writes exactly.
    pub version: Option<u64>,
    /// Part of a snapshot: published as `OP_SNAPSHOT`.
    pub snapshot: bool,
}

/// A published field: its value and the writer's merge rank as the replica knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedField {
    pub name: String,
    pub value: Value,
    pub rank: u32,
}

/// A change event to publish: every field carries the same clock `hlc` (for a delete, the
/// record clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub op: Op,
    pub hlc: u64,
    pub fields: Vec<PublishedField>,
}

/// The kind of change to make in the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApplyOp {
    /// Set the fields, creating the record when it has no local id.
    Upsert,
    /// Delete the record.
    Delete,
}

/// A change to make in the system: winning incoming values, the effect of a delete, or the
/// write-back of an overruled local edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyPlan {
    pub op: ApplyOp,
    /// The record's id in the system; `None`: create it.
    pub local_id: Option<String>,
    /// Fields to set (`None` clears one); empty for a delete.
    pub fields: Vec<(String, Value)>,
    /// The stamps of the incoming writes being applied (their fields are pending until
    /// [`Replica::applied`]).
    pub stamps: Vec<(String, Stamp)>,
    /// Persist the step's state before applying (the written fields are pending, so a crash
    /// before [`Replica::applied`] applies them again); otherwise persist it only after the
    /// apply (a delete: redelivered, it is applied again because it was not recorded).
    pub record_first: bool,
}

/// The result of a local change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalStep {
    /// The event to publish, if anything is new.
    pub publish: Option<Publish>,
    /// Values of higher-ranked owners to write back over the system's edit.
    pub write_back: Option<ApplyPlan>,
    /// Fields whose reported value the replica already holds.
    pub unchanged: u32,
    /// Fields reported as echoes of the adapter's own writes.
    pub echoes: u32,
    /// Fields reported with a version older than a write of the adapter's to them: values that
    /// write replaced before the feed reported them.
    pub superseded: u32,
    /// Fields whose edit a higher-ranked owner's value overrules.
    pub overruled: u32,
}

/// A field of a routed copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingField {
    pub name: String,
    pub value: Value,
    /// The writer's stamp, as the router set it.
    pub stamp: Stamp,
}

/// A routed copy of a change, decoded (fields the local schema does not know are left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub op: Op,
    pub fields: Vec<IncomingField>,
    /// This system's rank for each field of the mask (0 when the router listed none).
    pub ranks: Vec<(String, u32)>,
    /// The record clock (required for a delete).
    pub record_clock: Option<DeleteStamp>,
    /// The source may create records of the entity (the router says so). A copy that may not
    /// create is kept, not applied, by a replica whose system does not have the record; the
    /// first copy that may create it creates it with everything kept.
    pub may_create: bool,
}

/// The result of a routed copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingStep {
    /// Nothing in it is newer than what the replica holds (the state may still keep a losing
    /// write a delete can bring back).
    Stale,
    /// The replica's state changed, the system's does not (e.g. a delete of a record the system
    /// never had).
    Recorded,
    /// Apply this to the system.
    Apply(ApplyPlan),
}

/// The adapter rules of one system. Owns the system's hybrid logical clock; every other piece
/// of state is passed in per record ([`RecordState`]) and per entity ([`Ranks`]).
///
/// The clock never takes a value the router would refuse. The router accepts clocks up to
/// `clock_skew_ms` ahead of its own wall clock, and this system's wall clock may itself be up to
/// that much behind the router's: so a clock more than twice the skew ahead of this system's
/// wall clock cannot have come through the router honestly. Such clocks are not observed, and a
/// clock found that far ahead when it ticks (a state poisoned by a forged clock before the
/// router checked every clock, or a wall clock stepped far back) is reset to the wall clock
/// first. No other system holds a write stamped that far ahead (the router refused it), so a
/// reset loses nothing: the system's later writes simply carry honest stamps again.
/// [`Replica::clock_resets`] counts the resets.
#[derive(Debug, Clone)]
pub struct Replica {
    system: String,
    echoes: Echoes,
    echo_window_ms: u64,
    clock_skew_ms: u64,
    hlc: Hlc,
    clock_resets: u64,
}

/// The router's default `clock_skew_ms`.
pub const DEFAULT_CLOCK_SKEW_MS: u64 = 60_000;

impl Replica {
    /// The rules of `system`, whose clock has issued or observed nothing above `last_hlc` (the
    /// greatest clock in its state).
    pub fn new(
        system: impl Into<String>,
        echoes: Echoes,
        echo_window_ms: u64,
        last_hlc: u64,
    ) -> Replica {
        Replica {
            system: system.into(),
            echoes,
            echo_window_ms,
            clock_skew_ms: DEFAULT_CLOCK_SKEW_MS,
            hlc: Hlc::starting_at(last_hlc),
            clock_resets: 0,
        }
    }

    /// With the router's `clock_skew_ms` (how far ahead of the wall clock a clock may be).
    pub fn with_clock_skew(mut self, clock_skew_ms: u64) -> Replica {
        self.clock_skew_ms = clock_skew_ms;
        self
    }

    /// How often the clock was found beyond the skew and reset to the wall clock.
    pub fn clock_resets(&self) -> u64 {
        self.clock_resets
    }

    /// The furthest clock that can have come through the router at this system's wall time
    /// `now_ms` (see the type's docs).
    fn clock_limit(&self, now_ms: u64) -> u64 {
        let ms = now_ms.saturating_add(self.clock_skew_ms.saturating_mul(2));
        from_ms(ms.min(u64::MAX >> LOGICAL_BITS)) | ((1 << LOGICAL_BITS) - 1)
    }

    /// A clock value for a local write at `now_ms`, never beyond the skew.
    fn tick(&mut self, now_ms: u64) -> u64 {
        if self.hlc.last() > self.clock_limit(now_ms) {
            self.hlc = Hlc::starting_at(from_ms(now_ms));
            self.clock_resets += 1;
        }
        self.hlc.tick(now_ms)
    }

    pub fn system(&self) -> &str {
        &self.system
    }

    /// The system's clock.
    pub fn hlc(&self) -> &Hlc {
        &self.hlc
    }

    /// A change the system reported at wall time `now_ms`.
    pub fn local(
        &mut self,
        state: &mut RecordState,
        ranks: &Ranks,
        edit: &LocalEdit,
        now_ms: u64,
    ) -> LocalStep {
        let mut step = LocalStep::default();
        self.forget_expired_echoes(state, now_ms);
        let seen = take_version_echoes(state, edit.version);
        if seen.record_superseded {
            // The adapter deleted the record after this change: nothing of it is left.
            step.superseded = edit.fields.len().max(1) as u32;
            return step;
        }
        if edit.op == LocalOp::Delete {
            if state.live && !seen.exact {
                let hlc = self.tick(now_ms);
                state.tombstone = Some((hlc, self.system.clone()));
                state.live = false;
                // Every field was written before this delete (the clock just ticked past all of
                // them): the replica forgets them, as every receiver of the delete does.
                state.fields.clear();
                state.echoes.clear();
                step.publish = Some(Publish {
                    op: Op::Delete,
                    hlc,
                    fields: Vec::new(),
                });
            } else {
                step.unchanged = 1;
            }
            return step;
        }
        let is_new = !state.known;
        state.known = true;
        let appears = !state.live;
        if appears {
            state.local_id = Some(edit.local_id.clone());
            state.live = true;
        }
        let mut published = Vec::new();
        let mut write_back = Vec::new();
        let mut write_back_stamps = Vec::new();
        let mut hlc = None;
        for (name, value) in &edit.fields {
            let coalesced = seen.coalesced.get(name) == Some(value);
            if seen.echoed.contains(name)
                || coalesced
                || (!is_new && take_value_echo(state, name, value))
            {
                step.echoes += 1;
                continue;
            }
            if seen.superseded.contains(name) {
                step.superseded += 1;
                continue;
            }
            let own_rank = ranks.get(name).copied().unwrap_or(0);
            let stored = state.fields.get(name).and_then(|h| h.winner.as_ref());
            match classify_local(stored, value.as_deref(), &self.system, own_rank) {
                LocalWrite::Unchanged => step.unchanged += 1,
                LocalWrite::Overruled => {
                    step.overruled += 1;
                    write_back.push((name.clone(), stored.and_then(|s| s.value.clone())));
                }
                LocalWrite::Publish => {
                    let at = *hlc.get_or_insert_with(|| self.tick(now_ms));
                    // A local write is the newest: nothing below it can come back.
                    state
                        .fields
                        .entry(name.clone())
                        .or_default()
                        .local(FieldState {
                            value: value.clone(),
                            stamp: Stamp::new(own_rank, at, self.system.clone()),
                            pending: false,
                        });
                    state
                        .echoes
                        .retain(|e| !matches!(e, Echo::Value { field, .. } if field == name));
                    published.push(PublishedField {
                        name: name.clone(),
                        value: value.clone(),
                        rank: own_rank,
                    });
                }
            }
        }
        if appears {
            // The record appears in the system by its own users' hand: the values kept for it
            // (routed while the system did not have it) go to it now.
            for (name, held) in &state.fields {
                if let Some(w) = held.winner.as_ref().filter(|w| w.pending)
                    && !write_back.iter().any(|(n, _)| n == name)
                {
                    write_back.push((name.clone(), w.value.clone()));
                }
            }
        }
        // A value written back that was not applied yet is applied by the write-back.
        for (name, _) in &write_back {
            if let Some(w) = state
                .fields
                .get(name)
                .and_then(|h| h.winner.as_ref())
                .filter(|w| w.pending)
            {
                write_back_stamps.push((name.clone(), w.stamp.clone()));
            }
        }
        if !write_back.is_empty() {
            step.write_back = Some(ApplyPlan {
                op: ApplyOp::Upsert,
                local_id: Some(edit.local_id.clone()),
                fields: write_back,
                stamps: write_back_stamps,
                record_first: false,
            });
        }
        if let Some(hlc) = hlc {
            // OP_CREATE only for a record new to Concord: the echo of a record created by an
            // apply is an update (the system may not be allowed to create records).
            let op = match edit.op {
                _ if edit.snapshot => Op::Snapshot,
                LocalOp::Create if is_new => Op::Create,
                _ => Op::Upsert,
            };
            step.publish = Some(Publish {
                op,
                hlc,
                fields: published,
            });
        }
        step
    }

    /// A routed copy, received at wall time `now_ms`. Learns this system's ranks into `ranks`
    /// and the clocks into the HLC (those within the skew).
    pub fn incoming(
        &mut self,
        state: &mut RecordState,
        ranks: &mut Ranks,
        copy: &Incoming,
        now_ms: u64,
    ) -> IncomingStep {
        for (field, rank) in &copy.ranks {
            ranks.insert(field.clone(), *rank);
        }
        let limit = self.clock_limit(now_ms);
        let clocks = copy.fields.iter().map(|f| f.stamp.hlc);
        for hlc in clocks.chain(copy.record_clock.as_ref().map(|(h, _)| *h)) {
            if hlc <= limit {
                self.hlc.observe(hlc);
            }
        }
        if copy.op == Op::Delete {
            return match &copy.record_clock {
                Some((hlc, system)) => self.incoming_delete(state, ranks, (*hlc, system)),
                None => IncomingStep::Stale,
            };
        }
        let mut fields = Vec::new();
        let mut stamps = Vec::new();
        for f in &copy.fields {
            if predates(f.stamp.hlc, &f.stamp.system, state.delete_stamp()) {
                continue; // written before the record's delete
            }
            let rank = ranks.get(&f.name).copied().unwrap_or(0);
            let held = state.fields.entry(f.name.clone()).or_default();
            let incoming = FieldState {
                value: f.value.clone(),
                stamp: f.stamp.clone(),
                pending: true,
            };
            // A losing write may still be kept below the winner (a delete can bring it back).
            if held.receive(incoming, &self.system, rank) {
                fields.push((f.name.clone(), f.value.clone()));
                stamps.push((f.name.clone(), f.stamp.clone()));
            }
            state.known = true;
        }
        if !state.live {
            if !copy.may_create && !state.existed() {
                // Only a system that may create records makes a new one appear here: keep the
                // winners (pending) until one does. (A record that existed here before — it was
                // deleted — comes back with writes made after its delete, whoever made them:
                // the delete rule, which does not depend on the order of arrival.)
                return if fields.is_empty() {
                    IncomingStep::Stale
                } else {
                    IncomingStep::Recorded
                };
            }
            // Creating the record: with every winner kept until now.
            for (name, held) in &state.fields {
                if let Some(w) = held.winner.as_ref().filter(|w| w.pending)
                    && !stamps.iter().any(|(n, _)| n == name)
                {
                    fields.push((name.clone(), w.value.clone()));
                    stamps.push((name.clone(), w.stamp.clone()));
                }
            }
            if fields.is_empty() && copy.op != Op::Create {
                return IncomingStep::Stale;
            }
            state.known = true;
        } else if fields.is_empty() {
            return IncomingStep::Stale;
        }
        IncomingStep::Apply(ApplyPlan {
            op: ApplyOp::Upsert,
            local_id: state.live_id(),
            fields,
            stamps,
            record_first: true,
        })
    }

    /// A routed delete: every field drops the writes made before it and the greatest later
    /// write (if any) wins; the record goes only if no field keeps one.
    fn incoming_delete(
        &mut self,
        state: &mut RecordState,
        ranks: &Ranks,
        delete: (u64, &str),
    ) -> IncomingStep {
        if !delete_is_new(state.delete_stamp(), delete) {
            return IncomingStep::Stale;
        }
        let mut shown = Vec::new();
        let mut remove = true;
        for (name, held) in &mut state.fields {
            let rank = ranks.get(name).copied().unwrap_or(0);
            // What the system shows: the winner's value, or (while the winner is pending, not
            // applied yet) whatever it held before.
            let had_value = held
                .winner
                .as_ref()
                .is_some_and(|w| w.value.is_some() || w.pending);
            if held.apply_delete(delete, &self.system, rank) {
                let value = held.winner.as_ref().and_then(|w| w.value.clone());
                if value.is_some() || had_value {
                    shown.push((name.clone(), value));
                }
            }
            remove &= held.winner.is_none();
        }
        state
            .fields
            .retain(|_, h| h.winner.is_some() || !h.shadows.is_empty());
        state.tombstone = Some((delete.0, delete.1.to_owned()));
        state.known = true;
        let live_id = state.live_id();
        if remove {
            state.live = false;
        }
        match live_id {
            Some(id) if remove => IncomingStep::Apply(ApplyPlan {
                op: ApplyOp::Delete,
                local_id: Some(id),
                fields: Vec::new(),
                stamps: Vec::new(),
                record_first: false,
            }),
            Some(id) if !shown.is_empty() => IncomingStep::Apply(ApplyPlan {
                op: ApplyOp::Upsert,
                local_id: Some(id),
                fields: shown,
                stamps: Vec::new(),
                record_first: false,
            }),
            _ => {
                // When the system does not have the record, what the delete left (or brought
                // back) is not in it, and goes to it if the record is created.
                if !state.live {
                    for w in state.fields.values_mut().filter_map(|h| h.winner.as_mut()) {
                        w.pending = true;
                    }
                }
                IncomingStep::Recorded
            }
        }
    }

    /// The system applied `plan` (an incoming change or a write-back): the applied fields stop
    /// being pending, the record is mapped to `local_id`, and the feed's reports of the write
    /// are expected (by `version` when the apply returned the record's version after it).
    pub fn applied(
        &self,
        state: &mut RecordState,
        plan: &ApplyPlan,
        local_id: &str,
        version: Option<u64>,
        now_ms: u64,
    ) {
        for (name, stamp) in &plan.stamps {
            if let Some(w) = state.fields.get_mut(name).and_then(|h| h.winner.as_mut())
                && w.stamp == *stamp
            {
                w.pending = false;
            }
        }
        if plan.op == ApplyOp::Delete {
            if let (Echoes::Reported, Some(version)) = (self.echoes, version) {
                state.echoes.push(Echo::Version {
                    version,
                    fields: Vec::new(),
                    deleted: true,
                    at_ms: now_ms,
                });
            }
            return;
        }
        state.known = true;
        state.local_id = Some(local_id.to_owned());
        state.live = true;
        if self.echoes == Echoes::NotReported || plan.fields.is_empty() {
            return;
        }
        match version {
            Some(version) => state.echoes.push(Echo::Version {
                version,
                deleted: false,
                fields: plan.fields.clone(),
                at_ms: now_ms,
            }),
            None => state
                .echoes
                .extend(plan.fields.iter().map(|(field, value)| Echo::Value {
                    field: field.clone(),
                    value: value.clone(),
                    at_ms: now_ms,
                })),
        }
    }

    fn forget_expired_echoes(&self, state: &mut RecordState, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.echo_window_ms);
        state.echoes.retain(|e| e.at_ms() >= oldest);
    }
}

/// What the version of a reported change says about the adapter's own writes.
#[derive(Debug, Default)]
struct VersionMatch {
    /// The change is the adapter's own write of that very version.
    exact: bool,
    /// Fields the change echoes (those that write wrote).
    echoed: Vec<String>,
    /// Per field, the last value the adapter's writes coalesced into this change (older
    /// versions) gave it.
    coalesced: BTreeMap<String, Value>,
    /// Fields a later write of the adapter replaced (the change is older than that write).
    superseded: Vec<String>,
    /// A later delete of the adapter removed the record.
    record_superseded: bool,
}

/// Matches a change reported with `version` against the expected echoes. Expectations up to
/// `version` are consumed: the feed reported them, or coalesced them into this report.
fn take_version_echoes(state: &mut RecordState, version: Option<u64>) -> VersionMatch {
    let mut seen = VersionMatch::default();
    let Some(version) = version else {
        return seen;
    };
    state.echoes.retain(|e| match e {
        Echo::Version {
            version: v, fields, ..
        } if *v == version => {
            seen.exact = true;
            seen.echoed.extend(fields.iter().map(|(f, _)| f.clone()));
            false
        }
        Echo::Version {
            version: v, fields, ..
        } if *v < version => {
            // Oldest first: a later write's value replaces an earlier one's.
            seen.coalesced.extend(fields.iter().cloned());
            false
        }
        Echo::Version {
            fields, deleted, ..
        } => {
            seen.superseded
                .extend(fields.iter().map(|(f, _)| f.clone()));
            seen.record_superseded |= *deleted;
            true
        }
        Echo::Value { .. } => true,
    });
    seen
}

/// Whether a reported `field = value` is the (possibly late) echo of a value applied by value;
/// consumes that expectation and the older ones of the field.
fn take_value_echo(state: &mut RecordState, name: &str, value: &Value) -> bool {
    let Some(at) = state.echoes.iter().position(
        |e| matches!(e, Echo::Value { field, value: v, .. } if field == name && v == value),
    ) else {
        return false;
    };
    let mut i = 0;
    state.echoes.retain(|e| {
        let keep = i > at || !matches!(e, Echo::Value { field, .. } if field == name);
        i += 1;
        keep
    });
    true
}

/// The envelope of a [`Publish`] of record `key` of `entity` (whose message is `message`) by
/// `system`. `event_id` is a fresh UUID and `now_ms` the observation time (the caller's).
/// The record holds the published values in field-number order; a value that does not belong
/// to `message` is left out of the record (and stays in the mask: the field is cleared).
#[allow(clippy::too_many_arguments)]
pub fn change_event(
    system: &str,
    entity: &str,
    key: &str,
    message: &MessageDescriptor,
    publish: &Publish,
    event_id: String,
    now_ms: u64,
) -> ChangeEvent {
    let mut values: Vec<(u32, &[u8])> = publish
        .fields
        .iter()
        .filter_map(|f| {
            let number = message.get_field_by_name(&f.name)?.number();
            Some((number, f.value.as_deref()?))
        })
        .collect();
    values.sort_by_key(|(n, _)| *n);
    // Each value is a message with one field set: their concatenation is the record.
    let record = values.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    let clock = |rank| FieldClock {
        hlc: publish.hlc,
        system: system.to_owned(),
        rank,
    };
    let delete = publish.op == Op::Delete;
    ChangeEvent {
        event_id,
        source: system.to_owned(),
        entity: entity.to_owned(),
        key: key.to_owned(),
        op: publish.op.to_wire() as i32,
        record,
        field_mask: publish.fields.iter().map(|f| f.name.clone()).collect(),
        clocks: publish
            .fields
            .iter()
            .map(|f| (f.name.clone(), clock(f.rank)))
            .collect(),
        derived_from: String::new(),
        schema_version: concord_proto::SCHEMA_VERSION,
        origin: String::new(),
        observed_at_ms: now_ms,
        record_clock: delete.then(|| clock(0)),
        receiver_ranks: BTreeMap::new(),
        may_create: false,
    }
}

/// Why a routed copy cannot be processed (it goes to the system's dead-letter queue).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct CopyError {
    /// The code for header `concord-reason`.
    pub reason: DeadLetterReason,
    pub detail: String,
}

/// A routed copy decoded against the local schema's `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedCopy {
    pub copy: Incoming,
    /// Fields of the mask the local schema does not know (an older schema): left out.
    pub unknown: Vec<String>,
    /// Fields of the mask without a clock: left out.
    pub without_clock: Vec<String>,
}

/// Decodes the fields of a routed copy `ev` of an entity whose message is `message`.
pub fn decode_copy(
    ev: &ChangeEvent,
    message: &MessageDescriptor,
) -> Result<DecodedCopy, CopyError> {
    let op = Op::from_wire(ev.op).ok_or_else(|| CopyError {
        reason: DeadLetterReason::InvalidOp,
        detail: format!("op {}", ev.op),
    })?;
    let ranks = ev
        .field_mask
        .iter()
        .map(|f| (f.clone(), ev.receiver_ranks.get(f).copied().unwrap_or(0)))
        .collect();
    let record_clock = ev.record_clock.as_ref().map(|c| (c.hlc, c.system.clone()));
    let mut decoded = DecodedCopy {
        copy: Incoming {
            op,
            fields: Vec::new(),
            ranks,
            record_clock,
            may_create: ev.may_create,
        },
        unknown: Vec::new(),
        without_clock: Vec::new(),
    };
    if op == Op::Delete {
        if decoded.copy.record_clock.is_none() {
            return Err(CopyError {
                reason: DeadLetterReason::MissingClock,
                detail: "a delete needs record_clock".into(),
            });
        }
        return Ok(decoded);
    }
    let record = prost_reflect::DynamicMessage::decode(message.clone(), ev.record.as_slice())
        .map_err(|e| CopyError {
            reason: DeadLetterReason::InvalidRecord,
            detail: format!("record is not a valid {}: {e}", message.full_name()),
        })?;
    for name in &ev.field_mask {
        let Some(fd) = message.get_field_by_name(name) else {
            decoded.unknown.push(name.clone());
            continue;
        };
        let Some(clock) = ev.clocks.get(name) else {
            decoded.without_clock.push(name.clone());
            continue;
        };
        decoded.copy.fields.push(IncomingField {
            name: name.clone(),
            value: crate::value::encode_field(&record, &fd),
            stamp: Stamp::new(clock.rank, clock.hlc, clock.system.clone()),
        });
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Value {
        Some(s.as_bytes().to_vec())
    }

    /// A write of `f` by another owner; this system co-owns `f` (last writer wins).
    fn routed(value: &str, hlc: u64) -> Incoming {
        routed_with_rank(value, hlc, 1)
    }

    fn routed_with_rank(value: &str, hlc: u64, own_rank: u32) -> Incoming {
        Incoming {
            op: Op::Upsert,
            fields: vec![IncomingField {
                name: "f".into(),
                value: v(value),
                stamp: Stamp::new(1, hlc, "other"),
            }],
            ranks: vec![("f".into(), own_rank)],
            record_clock: None,
            may_create: true,
        }
    }

    /// The system applies `value` (written at `hlc` by another system) and its apply returns
    /// `token`.
    fn apply(
        r: &mut Replica,
        state: &mut RecordState,
        ranks: &mut Ranks,
        value: &str,
        hlc: u64,
        version: Option<u64>,
    ) {
        let IncomingStep::Apply(plan) = r.incoming(state, ranks, &routed(value, hlc), 1_000) else {
            panic!("{value} did not win");
        };
        r.applied(state, &plan, "local-1", version, 1_000);
    }

    fn user_sets(value: &str, version: Option<u64>) -> LocalEdit {
        LocalEdit {
            op: LocalOp::Upsert,
            local_id: "local-1".into(),
            fields: vec![("f".into(), v(value))],
            version,
            snapshot: false,
        }
    }

    /// The adapter applied A then B; the system's feed is a poller that coalesces, so it never
    /// reports the adapter's write of A, and the user sets the field back to A. The value
    /// fallback takes the user's A for the echo of the applied A: the edit is lost (the
    /// system shows A, every other copy B). A token-reporting feed, or a feed that never reports
    /// the adapter's own writes, publishes it.
    #[test]
    fn which_echo_mode_keeps_a_user_edit_back_to_an_applied_value() {
        let run = |echoes: Echoes, versions: [Option<u64>; 3]| {
            let mut r = Replica::new("sys", echoes, 60_000, 0);
            let (mut state, mut ranks) = (RecordState::default(), Ranks::new());
            apply(&mut r, &mut state, &mut ranks, "A", 10, versions[0]);
            apply(&mut r, &mut state, &mut ranks, "B", 20, versions[1]);
            r.local(&mut state, &ranks, &user_sets("A", versions[2]), 1_001)
                .publish
        };
        let lost = run(Echoes::Reported, [None, None, None]);
        assert_eq!(lost, None, "the value fallback takes the edit for an echo");
        let kept = run(Echoes::Reported, [Some(1), Some(2), Some(3)]);
        assert_eq!(kept.map(|p| p.fields[0].value.clone()), Some(v("A")));
        let kept = run(Echoes::NotReported, [None, None, None]);
        assert_eq!(kept.map(|p| p.fields[0].value.clone()), Some(v("A")));
    }

    #[test]
    fn version_echoes_are_exact_and_consume_older_versions() {
        let mut r = Replica::new("sys", Echoes::Reported, 60_000, 0);
        let (mut state, mut ranks) = (RecordState::default(), Ranks::new());
        apply(&mut r, &mut state, &mut ranks, "A", 10, Some(1));
        apply(&mut r, &mut state, &mut ranks, "B", 20, Some(2));
        // The feed reports the second write (a poller that never saw version 1): an echo.
        let step = r.local(&mut state, &ranks, &user_sets("B", Some(2)), 1_001);
        assert_eq!((step.publish, step.echoes), (None, 1));
        assert!(state.echoes.is_empty(), "version 1 was coalesced into 2");
        // A user's later change is published.
        let step = r.local(&mut state, &ranks, &user_sets("A", Some(3)), 1_002);
        assert!(step.publish.is_some());
    }

    /// The user edits the field (version 1), the adapter applies a routed value over it
    /// (version 2) before the feed reported the user's edit: the report of version 1 is a value
    /// the apply replaced, not a new edit, so nothing is published and the copies keep agreeing
    /// with the system.
    #[test]
    fn a_report_older_than_an_apply_is_superseded() {
        let mut r = Replica::new("sys", Echoes::Reported, 60_000, 0);
        let (mut state, mut ranks) = (RecordState::default(), Ranks::new());
        apply(&mut r, &mut state, &mut ranks, "routed", 10, Some(2));
        let step = r.local(&mut state, &ranks, &user_sets("user's", Some(1)), 1_001);
        assert_eq!((step.publish, step.superseded), (None, 1));
        let step = r.local(&mut state, &ranks, &user_sets("routed", Some(2)), 1_002);
        assert_eq!((step.publish, step.echoes), (None, 1));
    }

    #[test]
    fn value_echoes_expire_with_the_window() {
        let mut r = Replica::new("sys", Echoes::Reported, 100, 0);
        let (mut state, mut ranks) = (RecordState::default(), Ranks::new());
        apply(&mut r, &mut state, &mut ranks, "A", 10, None);
        apply(&mut r, &mut state, &mut ranks, "B", 20, None);
        // Within the window, A is taken for the late echo of the applied A.
        let mut early = state.clone();
        let step = r.local(&mut early, &ranks, &user_sets("A", None), 1_050);
        assert_eq!((step.publish, step.echoes), (None, 1));
        // After it, A is a user's edit.
        let step = r.local(&mut state, &ranks, &user_sets("A", None), 1_200);
        assert!(step.publish.is_some());
        assert!(state.echoes.is_empty());
    }

    #[test]
    fn a_non_owner_edit_of_an_owned_value_is_written_back_and_not_published() {
        let mut r = Replica::new("sys", Echoes::Reported, 60_000, 0);
        let (mut state, mut ranks) = (RecordState::default(), Ranks::new());
        let IncomingStep::Apply(plan) = r.incoming(
            &mut state,
            &mut ranks,
            &routed_with_rank("owner's", 10, 0),
            1_000,
        ) else {
            panic!("the first write wins");
        };
        r.applied(&mut state, &plan, "local-1", None, 1_000);
        let step = r.local(&mut state, &ranks, &user_sets("mine", None), 1_001);
        assert_eq!(step.publish, None);
        assert_eq!(step.overruled, 1);
        let back = step.write_back.expect("a write-back");
        assert_eq!(back.fields, vec![("f".to_owned(), v("owner's"))]);
        assert_eq!(back.local_id.as_deref(), Some("local-1"));
    }

    #[test]
    fn a_delete_is_recorded_after_it_is_applied_and_forgets_the_fields() {
        let mut r = Replica::new("sys", Echoes::Reported, 60_000, 0);
        let (mut state, mut ranks) = (RecordState::default(), Ranks::new());
        apply(&mut r, &mut state, &mut ranks, "A", 10, None);
        let delete = Incoming {
            op: Op::Delete,
            fields: Vec::new(),
            ranks: Vec::new(),
            record_clock: Some((30, "other".into())),
            may_create: true,
        };
        let IncomingStep::Apply(plan) = r.incoming(&mut state, &mut ranks, &delete, 1_000) else {
            panic!("the live record is deleted");
        };
        assert_eq!((plan.op, plan.record_first), (ApplyOp::Delete, false));
        assert!(state.fields.is_empty() && !state.live);
        // The same delete again changes nothing; an older write stays buried.
        assert_eq!(
            r.incoming(&mut state, &mut ranks, &delete, 1_000),
            IncomingStep::Stale
        );
        assert_eq!(
            r.incoming(&mut state, &mut ranks, &routed("old", 20), 1_000),
            IncomingStep::Stale
        );
        // The system reporting the delete (its echo) publishes nothing.
        let mut echo = user_sets("", None);
        echo.op = LocalOp::Delete;
        assert_eq!(r.local(&mut state, &ranks, &echo, 1_100).publish, None);
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;
    use crate::clock::physical_ms;

    const NOW: u64 = 1_700_000_000_000;
    const FAR: u64 = NOW + 10 * 24 * 3_600_000;

    fn edit(value: &str) -> LocalEdit {
        LocalEdit {
            op: LocalOp::Upsert,
            local_id: "l-1".into(),
            fields: vec![("f".into(), Some(value.as_bytes().to_vec()))],
            version: None,
            snapshot: false,
        }
    }

    /// A clock far ahead — persisted by an earlier release from a forged record clock — is
    /// reset at the next local write: the write carries an honest stamp the router accepts.
    #[test]
    fn a_poisoned_clock_is_reset_at_the_next_write() {
        let mut r = Replica::new("sys", Echoes::Reported, 60_000, from_ms(FAR));
        let mut state = RecordState::default();
        let step = r.local(&mut state, &Ranks::new(), &edit("a"), NOW);
        let hlc = step.publish.unwrap().hlc;
        assert_eq!(physical_ms(hlc), NOW);
        assert_eq!(r.clock_resets(), 1);
        // Within the skew, the clock is trusted and keeps moving forward.
        let step = r.local(&mut state, &Ranks::new(), &edit("b"), NOW);
        assert!(step.publish.unwrap().hlc > hlc);
        assert_eq!(r.clock_resets(), 1);
    }

    /// A routed copy carrying a clock no router would accept (a forged record clock on an
    /// upsert) does not move the clock; one within the skew does.
    #[test]
    fn clocks_beyond_the_skew_are_not_observed() {
        let mut r = Replica::new("sys", Echoes::Reported, 60_000, 0);
        let (mut state, mut ranks) = (RecordState::default(), Ranks::new());
        let copy = |record_clock: u64| Incoming {
            op: Op::Upsert,
            fields: Vec::new(),
            ranks: Vec::new(),
            record_clock: Some((record_clock, "other".into())),
            may_create: true,
        };
        r.incoming(&mut state, &mut ranks, &copy(from_ms(FAR)), NOW);
        assert!(physical_ms(r.hlc().last()) < NOW);
        r.incoming(&mut state, &mut ranks, &copy(from_ms(NOW + 30_000)), NOW);
        assert_eq!(physical_ms(r.hlc().last()), NOW + 30_000);
        let step = r.local(&mut state, &ranks, &edit("a"), NOW);
        assert!(physical_ms(step.publish.unwrap().hlc) == NOW + 30_000);
        assert_eq!(r.clock_resets(), 0);
    }
}

#[cfg(test)]
mod create_tests {
    use super::*;

    fn copy(value: &str, hlc: u64, may_create: bool, op: Op) -> Incoming {
        Incoming {
            op,
            fields: vec![IncomingField {
                name: "f".into(),
                value: Some(value.as_bytes().to_vec()),
                stamp: Stamp::new(1, hlc, "other"),
            }],
            ranks: vec![("f".into(), 0)],
            record_clock: None,
            may_create,
        }
    }

    /// A copy from a system that may not create records does not make one appear: its values
    /// are kept (pending) and go to the system with the first copy that may create the record.
    #[test]
    fn only_a_creator_makes_a_record_appear_and_kept_values_come_with_it() {
        let mut r = Replica::new("sys", Echoes::Reported, 60_000, 0);
        let (mut state, mut ranks) = (RecordState::default(), Ranks::new());
        let step = r.incoming(
            &mut state,
            &mut ranks,
            &copy("kept", 10, false, Op::Upsert),
            1,
        );
        assert_eq!(step, IncomingStep::Recorded);
        assert!(!state.live);
        let mut creation = copy("ignored", 5, true, Op::Create);
        creation.fields[0].name = "g".into();
        let IncomingStep::Apply(plan) = r.incoming(&mut state, &mut ranks, &creation, 1) else {
            panic!("the creator's copy creates the record");
        };
        assert_eq!(plan.local_id, None);
        let mut names: Vec<&str> = plan.fields.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["f", "g"]);
        r.applied(&mut state, &plan, "l-1", None, 1);
        assert!(
            state
                .fields
                .values()
                .all(|h| !h.winner.as_ref().unwrap().pending)
        );
        // A creation carrying no field the system sees still creates it.
        let (mut state, mut ranks) = (RecordState::default(), Ranks::new());
        let mut empty = copy("", 1, true, Op::Create);
        empty.fields.clear();
        assert!(matches!(
            r.incoming(&mut state, &mut ranks, &empty, 1),
            IncomingStep::Apply(ApplyPlan { local_id: None, .. })
        ));
    }
}
