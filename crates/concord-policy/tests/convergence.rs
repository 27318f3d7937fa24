//! Deterministic convergence simulation.
//!
//! N simulated systems each run the adapter rules of the pure core — the very state machine the
//! adapter SDK's engine runs, `replica::Replica`, over one `RecordState` per record and the
//! `Ranks` the router tells it — and the real `route::process` routes between them. A seeded
//! simulated broker delays, reorders and duplicates messages on both legs (adapter → router and
//! router → inbox), adapters crash between recording a change and applying it, and every
//! system's wall clock has its own offset and drift.
//!
//! The simulation plays only what the engine's shell does around the machine: it keeps the
//! states (persisting a step's state before the apply when the step says so, and restoring it
//! when a crash loses an unrecorded step), builds envelopes with `replica::change_event`,
//! decodes routed copies with `replica::decode_copy`, and plays each system with its data and
//! its change feed. Feeds come in four kinds (one per schedule, in turn):
//! - `Values`: every write, the adapter's own included, is reported at once without a version;
//!   the adapter recognises its echoes by value;
//! - `Versions`: every write is reported with the record's version, in order but late (a CDC
//!   log read behind the writes), so a user's edit can be reported after an apply overwrote it;
//! - `Polled`: a poller that reads the record's current values and version, coalescing every
//!   change since its last look (it may never see a value the adapter wrote);
//! - `NotReported`: the adapter's own writes are never reported; a user's change is reported
//!   late, and the values are read when it is reported (as capture triggers that skip the
//!   adapter's transactions, read by a poller).
//!
//! Deletes by a user are reported at once, after every change the feed still held.
//!
//! The invariant checked once the broker and every feed are quiet, after a final round in which
//! every owner of every declared field writes a fresh value for every key:
//! - every system holds, for every field it can see, the value and (hlc, system) stamp of the
//!   greatest accepted write (ordered by policy rank, hlc, system; i.e. the owner's latest write
//!   for single-owner fields, the greatest stamp for lww fields, the highest-priority owner's
//!   latest write for priority fields) and the system's own data equals it; stamps written by
//!   other systems carry the policy's rank; nothing is left pending;
//! - no replica holds another system's value of a field it cannot see;
//! - no echo amplification: a report made only of the adapter's own writes never publishes,
//!   the number of router inputs equals the number of published changes (broker duplicates
//!   counted apart), and each input yields at most one delivery per other system.
//!
//! With deletes (`delete_per_mille`), systems allowed to delete records also delete them.
//! Those schedules skip the final round, so records stay deleted or partly cleared, and the
//! check expects, per field, the greatest accepted write made after the record's newest delete
//! (or nothing).
//!
//! In the runaway case one system's clock is beyond the router's `clock_skew_ms`: all its events
//! are dead-lettered (`clock_skew`), its writes reach no other system, and every other system
//! converges as above. (The runaway system itself keeps its own unroutable values locally.)

// Test code: a panic is how a broken fixture or a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::OnceLock;

use common::*;
use concord_policy::clock::Hlc;
use concord_policy::replica::{
    ApplyOp, ApplyPlan, Echoes, FieldState, IncomingStep, LocalEdit, LocalOp, LocalWrite, Ranks,
    RecordState, Replica, change_event, classify_local, decode_copy, incoming_wins, predates,
};
use concord_policy::route::{self, DeadLetterReason, Input, Outcome, RouterSettings};
use concord_policy::{EntityPolicy, FieldSet, Policy, Stamp, value};
use concord_proto::v1::ChangeEvent;
use prost::Message;
use prost_reflect::DynamicMessage;

const KEYS: [&str; 2] = ["c-1", "c-2"];
const START_MS: u64 = NOW_MS;
const ECHO_WINDOW_MS: u64 = 3_600_000;

/// How a system's change feed reports changes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    Values,
    Versions,
    Polled,
    NotReported,
}

const FEEDS: [Feed; 4] = [
    Feed::Values,
    Feed::Versions,
    Feed::Polled,
    Feed::NotReported,
];

#[derive(Debug, Clone, Copy)]
struct Config {
    /// Local edits before the final round.
    edits: usize,
    /// Probability (per mille) that the broker delivers a message twice.
    dup_per_mille: u64,
    /// Probability (per mille) that an adapter crashes after recording a change, before applying.
    crash_per_mille: u64,
    /// Largest wall-clock offset of a system, in ms (either direction).
    max_offset_ms: i64,
    /// Largest wall-clock drift, in parts per million (either direction).
    max_drift_ppm: i64,
    /// Make one system's clock run beyond the router's clock skew.
    runaway: bool,
    /// Ignore the ranks the router sends (wrong; used to show the checker finds it).
    ignore_receiver_ranks: bool,
    /// Probability (per mille) that an edit by a system allowed to delete records is a delete.
    delete_per_mille: u64,
    /// End with the round in which every owner writes every field (which recreates every
    /// deleted record). Without it, the check also covers records left deleted or partly
    /// cleared by deletes.
    final_round: bool,
    /// The feed of every system; `None`: each schedule takes the next of [`FEEDS`].
    feed: Option<Feed>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            edits: 50,
            dup_per_mille: 150,
            crash_per_mille: 50,
            max_offset_ms: 20_000,
            max_drift_ppm: 50_000,
            runaway: false,
            ignore_receiver_ranks: false,
            delete_per_mille: 0,
            final_round: true,
            feed: None,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    /// Local changes that published an event.
    published: u64,
    /// Of those, reports made only of the adapter's own writes (echoes): must stay 0.
    published_by_echo: u64,
    /// Events the router processed, not counting broker duplicates.
    router_inputs: u64,
    router_duplicates: u64,
    dead_letters: u64,
    deliveries: u64,
    delivery_duplicates: u64,
    crashes: u64,
    overruled: u64,
    rejected_fields: u64,
    /// Deletes published.
    deletes: u64,
    /// Fields whose value a delivered delete changed (cleared, or a later write brought back).
    cleared: u64,
    /// Reported fields recognised as echoes of the adapter's own writes.
    echoes: u64,
    /// Reported fields an apply had replaced before the feed reported them.
    superseded: u64,
}

/// A change the feed has not reported yet.
#[derive(Debug, Clone)]
struct Report {
    key: usize,
    /// The written fields and their values (for `NotReported`, the values are read when the
    /// change is reported).
    fields: Vec<(&'static str, Option<Vec<u8>>)>,
    /// The record's version after the write.
    version: u64,
    /// Written by the adapter (an apply), not by a user.
    own: bool,
    /// The record was deleted.
    delete: bool,
}

/// One adapter and the system behind it.
struct Node {
    name: String,
    index: usize,
    owns: FieldSet,
    sees: FieldSet,
    /// May delete records.
    deletes: bool,
    feed: Feed,
    /// The adapter rules (and the system's clock).
    replica: Replica,
    offset_ms: i64,
    drift_ppm: i64,
    /// The adapter's state per record.
    records: BTreeMap<usize, RecordState>,
    ranks: Ranks,
    /// The system's own data: per (key, field), the encoded value (absent = never set).
    data: BTreeMap<(usize, &'static str), Option<Vec<u8>>>,
    /// The records that exist in the system.
    exists: BTreeSet<usize>,
    /// Per record, its version in the system (bumped by every write).
    versions: BTreeMap<usize, u64>,
    /// Changes not reported yet, oldest first.
    pending: VecDeque<Report>,
}

impl Node {
    fn state(&mut self, key: usize) -> &mut RecordState {
        self.records.entry(key).or_default()
    }

    fn held(&self, key: usize, f: &str) -> Option<&FieldState> {
        self.records
            .get(&key)
            .and_then(|r| r.fields.get(f))
            .and_then(|h| h.winner.as_ref())
    }

    /// Writes `values` to record `key` of the system; returns the record's new version.
    fn write(&mut self, key: usize, values: &[(&'static str, Option<Vec<u8>>)], own: bool) -> u64 {
        for (f, v) in values {
            self.data.insert((key, f), v.clone());
        }
        self.exists.insert(key);
        let version = self.versions.entry(key).or_default();
        *version += 1;
        let version = *version;
        if !(own && self.feed == Feed::NotReported) {
            self.pending.push_back(Report {
                key,
                fields: values.to_vec(),
                version,
                own,
                delete: false,
            });
        }
        version
    }

    /// Deletes record `key` in the system; returns the record's new version. The feed reports
    /// an apply's delete like any other write (a user's delete is reported at once, by
    /// [`Sim::user_delete`]).
    fn erase(&mut self, key: usize, own: bool) -> u64 {
        for ((k, _), value) in self.data.iter_mut() {
            if *k == key {
                *value = None;
            }
        }
        self.exists.remove(&key);
        let version = self.versions.entry(key).or_default();
        *version += 1;
        let version = *version;
        if own && self.feed != Feed::NotReported {
            self.pending.push_back(Report {
                key,
                fields: Vec::new(),
                version,
                own,
                delete: true,
            });
        }
        version
    }
}

#[derive(Debug, Clone)]
struct Ingress {
    source: usize,
    key: usize,
    body: Vec<u8>,
    hlc: u64,
    /// The published fields and their encoded values.
    fields: Vec<(&'static str, Option<Vec<u8>>)>,
    /// A delete of the record (stamped `hlc`).
    delete: bool,
    duplicate: bool,
}

#[derive(Debug, Clone)]
struct InboxMsg {
    target: usize,
    body: Vec<u8>,
    duplicate: bool,
    crashes: u8,
}

/// An accepted write: its stamp (with the policy's rank) and encoded value.
type Write = (Stamp, Option<Vec<u8>>);

struct Sim<'p> {
    policy: &'p Policy,
    entity: &'p EntityPolicy,
    settings: RouterSettings,
    cfg: Config,
    rng: Rng,
    now: u64,
    nodes: Vec<Node>,
    ingress: Vec<Ingress>,
    inbox: Vec<InboxMsg>,
    /// The greatest accepted write per (key, field): stamp with the policy's rank, and value.
    best: BTreeMap<(usize, &'static str), Write>,
    /// The newest accepted delete per key: `(hlc, system)`.
    deleted: BTreeMap<usize, (u64, String)>,
    /// Every accepted write per (key, field).
    writes: BTreeMap<(usize, &'static str), Vec<Write>>,
    tag: u64,
    event_seq: u128,
    runaway: Option<usize>,
    stats: Stats,
}

/// The Customer's field names, in field-number order.
fn customer_fields() -> &'static [&'static str] {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut fields: Vec<_> = customer().fields().collect();
        fields.sort_by_key(|f| f.number());
        fields
            .iter()
            .map(|f| &*Box::leak(f.name().to_owned().into_boxed_str()))
            .collect()
    })
}

fn field_of(name: &str) -> &'static str {
    customer_fields()
        .iter()
        .copied()
        .find(|f| *f == name)
        .unwrap_or_else(|| panic!("not a Customer field: {name}"))
}

impl<'p> Sim<'p> {
    fn new(policy: &'p Policy, cfg: Config, seed: u64) -> Sim<'p> {
        let entity = policy.entity("customer").unwrap();
        let settings = RouterSettings::default();
        let mut rng = Rng::new(seed);
        let feed = cfg
            .feed
            .unwrap_or(FEEDS[(seed % FEEDS.len() as u64) as usize]);
        let echoes = match feed {
            Feed::NotReported => Echoes::NotReported,
            _ => Echoes::Reported,
        };
        let nodes: Vec<Node> = policy
            .system_ids()
            .map(|id| Node {
                name: policy.system_name(id).to_owned(),
                index: id.index(),
                owns: entity.owned_by(id),
                sees: entity.visible_to(id),
                deletes: entity.delete.contains(id),
                feed,
                replica: Replica::new(policy.system_name(id), echoes, ECHO_WINDOW_MS, 0),
                offset_ms: rng.range_i64(-cfg.max_offset_ms, cfg.max_offset_ms),
                drift_ppm: rng.range_i64(-cfg.max_drift_ppm, cfg.max_drift_ppm),
                records: BTreeMap::new(),
                ranks: Ranks::new(),
                data: BTreeMap::new(),
                exists: BTreeSet::new(),
                versions: BTreeMap::new(),
                pending: VecDeque::new(),
            })
            .collect();
        let mut sim = Sim {
            policy,
            entity,
            settings,
            cfg,
            rng,
            now: START_MS,
            nodes,
            ingress: Vec::new(),
            inbox: Vec::new(),
            best: BTreeMap::new(),
            deleted: BTreeMap::new(),
            writes: BTreeMap::new(),
            tag: 0,
            event_seq: 0,
            runaway: None,
            stats: Stats::default(),
        };
        if cfg.runaway {
            let r = sim.rng.below(sim.nodes.len());
            let skew = sim.settings.clock_skew_ms as i64;
            // Beyond the skew by more than a schedule lasts (a few simulated seconds), so every
            // event it publishes is refused however long the broker holds it.
            sim.nodes[r].offset_ms = 2 * skew + sim.rng.range_i64(0, skew);
            sim.runaway = Some(r);
        }
        sim
    }

    fn wall(&self, node: usize) -> u64 {
        let n = &self.nodes[node];
        let elapsed = (self.now - START_MS) as i64;
        (self.now as i64 + n.offset_ms + elapsed * n.drift_ppm / 1_000_000) as u64
    }

    fn index_in_policy(&self, f: &str) -> Option<usize> {
        self.entity.field_index(f)
    }

    fn owns(&self, node: usize, f: &str) -> bool {
        self.index_in_policy(f)
            .is_some_and(|i| self.nodes[node].owns.contains(i))
    }

    fn sees(&self, node: usize, f: &str) -> bool {
        self.index_in_policy(f)
            .is_some_and(|i| self.nodes[node].sees.contains(i))
    }

    fn next_value(&mut self, f: &'static str, clear: bool) -> Option<Vec<u8>> {
        self.tag += 1;
        if clear {
            return None;
        }
        let rec = record_with(&[f], self.tag);
        value::encode_field(&rec, &field(f))
    }

    fn next_event_id(&mut self) -> String {
        self.event_seq += 1;
        uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | self.event_seq)
            .to_string()
    }

    /// The feed of `node` reports its oldest pending change (a `Polled` feed: everything
    /// pending for that record, coalesced, with the current values and version). Returns
    /// whether there was one.
    fn report_one(&mut self, node: usize) -> Result<bool, String> {
        let n = &mut self.nodes[node];
        let Some(first) = n.pending.pop_front() else {
            return Ok(false);
        };
        let key = first.key;
        let mut reports = vec![first];
        if matches!(n.feed, Feed::Polled | Feed::NotReported) {
            let (same, rest): (VecDeque<Report>, VecDeque<Report>) =
                n.pending.drain(..).partition(|r| r.key == key);
            n.pending = rest;
            reports.extend(same);
        }
        let own = reports.iter().all(|r| r.own);
        let (fields, version, delete) = match n.feed {
            Feed::Values | Feed::Versions => (
                reports[0].fields.clone(),
                reports[0].version,
                reports[0].delete,
            ),
            Feed::Polled | Feed::NotReported => {
                let mut names: Vec<&'static str> = reports
                    .iter()
                    .flat_map(|r| r.fields.iter().map(|(f, _)| *f))
                    .collect();
                names.sort_unstable();
                names.dedup();
                let now: Vec<_> = names
                    .into_iter()
                    .map(|f| (f, n.data.get(&(key, f)).cloned().flatten()))
                    .collect();
                // A poller that finds the record gone reports a delete.
                let gone = !n.exists.contains(&key);
                (now, n.versions.get(&key).copied().unwrap_or(0), gone)
            }
        };
        let version = matches!(n.feed, Feed::Versions | Feed::Polled).then_some(version);
        if delete {
            self.reported_delete(node, key, version, own)?;
        } else {
            self.local_change(node, key, fields, version, own)?;
        }
        Ok(true)
    }

    /// The adapter of `node` processes a change of record `key` its feed reported: `values`,
    /// with the record's `version` if the feed reports one; `own` when the report holds only
    /// the adapter's own writes. Returns whether an event was published.
    fn local_change(
        &mut self,
        node: usize,
        key: usize,
        values: Vec<(&'static str, Option<Vec<u8>>)>,
        version: Option<u64>,
        own: bool,
    ) -> Result<bool, String> {
        let wall = self.wall(node);
        let edit = LocalEdit {
            op: LocalOp::Upsert,
            local_id: KEYS[key].to_owned(),
            fields: values
                .iter()
                .map(|(f, v)| ((*f).to_owned(), v.clone()))
                .collect(),
            version,
            snapshot: false,
        };
        let n = &mut self.nodes[node];
        let mut state = n.records.remove(&key).unwrap_or_default();
        let step = n.replica.local(&mut state, &n.ranks, &edit, wall);
        n.records.insert(key, state);
        self.stats.echoes += u64::from(step.echoes);
        self.stats.superseded += u64::from(step.superseded);
        if let Some(plan) = &step.write_back {
            if own {
                return Err(format!(
                    "{}: the report of its own write is overruled",
                    n.name
                ));
            }
            self.stats.overruled += u64::from(step.overruled);
            // Write the winning values back, as the engine does after committing the step.
            self.apply(node, key, plan)?;
        }
        let Some(publish) = step.publish else {
            return Ok(false);
        };
        if own {
            self.stats.published_by_echo += 1;
        }
        let event_id = self.next_event_id();
        let n = &self.nodes[node];
        let ev = change_event(
            &n.name,
            "customer",
            KEYS[key],
            &customer(),
            &publish,
            event_id,
            wall,
        );
        let fields = publish
            .fields
            .iter()
            .map(|f| (field_of(&f.name), f.value.clone()))
            .collect();
        self.ingress.push(Ingress {
            source: node,
            key,
            body: ev.encode_to_vec(),
            hlc: publish.hlc,
            fields,
            delete: false,
            duplicate: false,
        });
        self.stats.published += 1;
        Ok(true)
    }

    /// Makes `plan` happen in the system of `node` and tells the machine (the engine's apply and
    /// its record step).
    fn apply(&mut self, node: usize, key: usize, plan: &ApplyPlan) -> Result<(), String> {
        let n = &mut self.nodes[node];
        let version = match plan.op {
            ApplyOp::Delete => Some(n.erase(key, true)),
            ApplyOp::Upsert => {
                let values: Vec<_> = plan
                    .fields
                    .iter()
                    .map(|(f, v)| (field_of(f), v.clone()))
                    .collect();
                Some(n.write(key, &values, true))
            }
        };
        let version = version.filter(|_| matches!(n.feed, Feed::Versions | Feed::Polled));
        let wall = self.wall(node);
        let n = &mut self.nodes[node];
        let mut state = n.records.remove(&key).unwrap_or_default();
        n.replica
            .applied(&mut state, plan, KEYS[key], version, wall);
        n.records.insert(key, state);
        if n.feed == Feed::Values {
            // This feed reports at once.
            while self.report_one(node)? {}
        }
        Ok(())
    }

    /// A user of `node` edits fields of record `key`: the system stores them and its feed
    /// reports the change (at once, or later).
    fn user_edit(
        &mut self,
        node: usize,
        key: usize,
        values: Vec<(&'static str, Option<Vec<u8>>)>,
    ) -> Result<(), String> {
        self.nodes[node].write(key, &values, false);
        if self.nodes[node].feed == Feed::Values || self.rng.chance(1, 3) {
            while self.report_one(node)? {}
        }
        Ok(())
    }

    /// A user of `node` deletes record `key`: the feed reports everything before it, then the
    /// delete.
    fn user_delete(&mut self, node: usize, key: usize) -> Result<(), String> {
        while self.report_one(node)? {}
        self.nodes[node].erase(key, false);
        self.reported_delete(node, key, None, false)
    }

    /// The adapter of `node` processes a reported delete of record `key`: a user's is published
    /// with its record clock, an echo of its own publishes nothing.
    fn reported_delete(
        &mut self,
        node: usize,
        key: usize,
        version: Option<u64>,
        own: bool,
    ) -> Result<(), String> {
        let wall = self.wall(node);
        let edit = LocalEdit {
            op: LocalOp::Delete,
            local_id: KEYS[key].to_owned(),
            fields: Vec::new(),
            version,
            snapshot: false,
        };
        let n = &mut self.nodes[node];
        let mut state = n.records.remove(&key).unwrap_or_default();
        let step = n.replica.local(&mut state, &n.ranks, &edit, wall);
        n.records.insert(key, state);
        let Some(publish) = step.publish else {
            return Ok(());
        };
        if own {
            self.stats.published_by_echo += 1;
        }
        let event_id = self.next_event_id();
        let n = &self.nodes[node];
        let ev = change_event(
            &n.name,
            "customer",
            KEYS[key],
            &customer(),
            &publish,
            event_id,
            wall,
        );
        self.ingress.push(Ingress {
            source: node,
            key,
            body: ev.encode_to_vec(),
            hlc: publish.hlc,
            fields: Vec::new(),
            delete: true,
            duplicate: false,
        });
        self.stats.published += 1;
        self.stats.deletes += 1;
        Ok(())
    }

    /// A user of `node` edits 1..=3 fields of a random record, or deletes it.
    fn random_edit(&mut self, node: usize) -> Result<(), String> {
        let key = self.rng.below(KEYS.len());
        if self.nodes[node].deletes && self.rng.chance(self.cfg.delete_per_mille, 1000) {
            return self.user_delete(node, key);
        }
        let all = customer_fields();
        let owned: Vec<&'static str> = all.iter().copied().filter(|f| self.owns(node, f)).collect();
        let seen: Vec<&'static str> = all
            .iter()
            .copied()
            .filter(|f| self.sees(node, f) && !self.owns(node, f))
            .collect();
        let n = 1 + self.rng.below(3);
        let mut chosen: Vec<&'static str> = Vec::new();
        for _ in 0..n {
            let roll = self.rng.below(100);
            let pool: &[&'static str] = if roll < 55 && !owned.is_empty() {
                &owned
            } else if roll < 80 && !seen.is_empty() {
                &seen
            } else {
                all
            };
            let f = pool[self.rng.below(pool.len())];
            if !chosen.contains(&f) {
                chosen.push(f);
            }
        }
        let mut values = Vec::new();
        for f in chosen {
            let clear = self.rng.chance(1, 10);
            values.push((f, self.next_value(f, clear)));
        }
        self.user_edit(node, key, values)
    }

    fn route_one(&mut self) -> Result<(), String> {
        let i = self.rng.below(self.ingress.len());
        let msg = self.ingress.swap_remove(i);
        if !msg.duplicate && self.rng.chance(self.cfg.dup_per_mille, 1000) {
            self.ingress.push(Ingress {
                duplicate: true,
                ..msg.clone()
            });
        }
        if msg.duplicate {
            self.stats.router_duplicates += 1;
        } else {
            self.stats.router_inputs += 1;
        }
        let src = &self.nodes[msg.source].name;
        let routing_key = format!("{src}.customer");
        let out = route::process(
            self.policy,
            &self.settings,
            self.now,
            Input {
                routing_key: &routing_key,
                body: &msg.body,
                user_id: Some(src),
                concord_key: None,
            },
        );
        let routed = match out {
            Outcome::DeadLetter(d) => {
                if Some(msg.source) != self.runaway || d.reason != DeadLetterReason::ClockSkew {
                    return Err(format!("unexpected dead letter from {src}: {d:?}"));
                }
                self.stats.dead_letters += 1;
                return Ok(());
            }
            Outcome::Routed(r) => r,
        };
        if Some(msg.source) == self.runaway
            && msg
                .fields
                .iter()
                .any(|(f, _)| self.index_in_policy(f).is_some())
        {
            return Err(format!("the runaway {src}'s event was routed"));
        }
        if msg.delete {
            let stamp = (msg.hlc, src.clone());
            let newest = self.deleted.entry(msg.key).or_insert_with(|| stamp.clone());
            if stamp > *newest {
                *newest = stamp;
            }
        }
        let mut accepted = 0;
        for (f, value) in &msg.fields {
            let Some(i) = self.index_in_policy(f) else {
                continue;
            };
            if !self.nodes[msg.source].owns.contains(i) {
                self.stats.rejected_fields += 1;
                continue;
            }
            accepted += 1;
            let rank = self.entity.fields[i].rank_of(self.policy.system_id(src).unwrap());
            let stamp = Stamp::new(rank, msg.hlc, src.clone());
            self.writes
                .entry((msg.key, *f))
                .or_default()
                .push((stamp.clone(), value.clone()));
            let slot = self
                .best
                .entry((msg.key, *f))
                .or_insert((stamp.clone(), value.clone()));
            if stamp > slot.0 {
                *slot = (stamp, value.clone());
            }
        }
        if routed.accepted != accepted {
            return Err(format!(
                "router accepted {} fields, expected {accepted}",
                routed.accepted
            ));
        }
        for d in routed.deliveries {
            let target = self
                .policy
                .system_id(&d.system)
                .ok_or("delivery to an unknown system")?
                .index();
            if target == msg.source {
                return Err(format!("delivery back to the source {src}"));
            }
            if !msg.duplicate {
                self.stats.deliveries += 1;
            }
            self.inbox.push(InboxMsg {
                target,
                body: d.body,
                duplicate: false,
                crashes: 0,
            });
        }
        Ok(())
    }

    /// The adapter of the target processes one routed copy, as the engine does: run the step,
    /// persist its state before the apply when the step says so, apply, record.
    fn deliver_one(&mut self) -> Result<(), String> {
        let i = self.rng.below(self.inbox.len());
        let msg = self.inbox.swap_remove(i);
        if !msg.duplicate && self.rng.chance(self.cfg.dup_per_mille, 1000) {
            self.stats.delivery_duplicates += 1;
            self.inbox.push(InboxMsg {
                duplicate: true,
                ..msg.clone()
            });
        }
        let t = msg.target;
        let ev = ChangeEvent::decode(msg.body.as_slice()).map_err(|e| e.to_string())?;
        let key = KEYS
            .iter()
            .position(|k| *k == ev.key)
            .ok_or("unknown key")?;
        let mut decoded = decode_copy(&ev, &customer()).map_err(|e| e.to_string())?;
        if !decoded.unknown.is_empty() || !decoded.without_clock.is_empty() {
            return Err(format!("bad copy: {decoded:?}"));
        }
        for f in &decoded.copy.fields {
            if !self.sees(t, &f.name) {
                return Err(format!(
                    "{} received {}, which it cannot see",
                    self.nodes[t].name, f.name
                ));
            }
        }
        if self.cfg.ignore_receiver_ranks {
            decoded.copy.ranks.clear();
        }
        let wall = self.wall(t);
        let n = &mut self.nodes[t];
        let before = n.state(key).clone();
        let mut state = n.records.remove(&key).unwrap_or_default();
        let step = n
            .replica
            .incoming(&mut state, &mut n.ranks, &decoded.copy, wall);
        n.records.insert(key, state);
        let plan = match step {
            IncomingStep::Stale | IncomingStep::Recorded => return Ok(()),
            IncomingStep::Apply(plan) => plan,
        };
        if msg.crashes < 2 && self.rng.chance(self.cfg.crash_per_mille, 1000) {
            // Crash before applying and acknowledging: a step recorded first stays recorded
            // (its fields pending), the other is lost. The broker redelivers the message.
            self.stats.crashes += 1;
            if !plan.record_first {
                self.nodes[t].records.insert(key, before);
            }
            self.inbox.push(InboxMsg {
                crashes: msg.crashes + 1,
                ..msg
            });
            return Ok(());
        }
        if ev.op == concord_proto::v1::Op::Delete as i32 {
            self.stats.cleared += plan.fields.len() as u64;
        }
        self.apply(t, key, &plan)
    }

    /// Delivers one in-flight message or reports one pending change, if any.
    fn pump(&mut self) -> Result<bool, String> {
        let feeds: Vec<usize> = (0..self.nodes.len())
            .filter(|n| !self.nodes[*n].pending.is_empty())
            .collect();
        let mut choices = Vec::new();
        if !self.ingress.is_empty() {
            choices.push(0);
        }
        if !self.inbox.is_empty() {
            choices.push(1);
        }
        if !feeds.is_empty() {
            choices.push(2);
        }
        if choices.is_empty() {
            return Ok(false);
        }
        match choices[self.rng.below(choices.len())] {
            0 => self.route_one()?,
            1 => self.deliver_one()?,
            _ => {
                let node = feeds[self.rng.below(feeds.len())];
                self.report_one(node)?;
            }
        }
        Ok(true)
    }

    fn tick_time(&mut self) {
        self.now += self.rng.below(25) as u64;
    }

    fn run(&mut self) -> Result<(), String> {
        // Random edits interleaved with deliveries.
        let mut left = self.cfg.edits;
        while left > 0 {
            self.tick_time();
            if self.rng.chance(2, 5) || (self.ingress.is_empty() && self.inbox.is_empty()) {
                let node = self.rng.below(self.nodes.len());
                self.random_edit(node)?;
                left -= 1;
            } else {
                self.pump()?;
            }
        }
        if self.cfg.final_round {
            self.final_round()?;
        }
        // Quiet: no more local edits; drain the broker and the feeds.
        while self.pump()? {
            self.tick_time();
        }
        self.check()
    }

    /// Every owner writes every declared field of every record once.
    fn final_round(&mut self) -> Result<(), String> {
        let mut finals = Vec::new();
        for key in 0..KEYS.len() {
            for rule in &self.entity.fields {
                for o in &rule.owners {
                    finals.push((o.index(), key, field_of(&rule.name)));
                }
            }
        }
        self.rng.shuffle(&mut finals);
        for (node, key, f) in finals {
            while self.rng.chance(1, 2) && self.pump()? {
                self.tick_time();
            }
            self.tick_time();
            let v = self.next_value(f, false);
            self.user_edit(node, key, vec![(f, v)])?;
        }
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        let s = &self.stats;
        if s.published_by_echo != 0 {
            return Err(format!("{} echoes were published", s.published_by_echo));
        }
        if s.router_inputs != s.published {
            return Err(format!(
                "router saw {} inputs for {} publishes",
                s.router_inputs, s.published
            ));
        }
        let fanout = self.nodes.len().saturating_sub(1) as u64;
        if s.deliveries > s.router_inputs * fanout {
            return Err(format!(
                "{} deliveries for {} inputs",
                s.deliveries, s.router_inputs
            ));
        }
        for n in &self.nodes {
            for (key, key_name) in KEYS.iter().enumerate() {
                for &f in customer_fields() {
                    let at = format!("{} ({:?} feed) {key_name} {f}", n.name, n.feed);
                    let held = n.held(key, f);
                    if !self.sees(n.index, f) {
                        if held.is_some_and(|h| h.stamp.system != n.name) {
                            return Err(format!(
                                "{at}: replica holds another system's value of a field it cannot see"
                            ));
                        }
                        continue;
                    }
                    // The greatest write made after the record's newest delete.
                    let deleted = self.deleted.get(&key).map(|(h, s)| (*h, s.as_str()));
                    let best = self.writes.get(&(key, f)).and_then(|writes| {
                        writes
                            .iter()
                            .filter(|(stamp, _)| !predates(stamp.hlc, &stamp.system, deleted))
                            .max_by(|a, b| a.0.cmp(&b.0))
                    });
                    if Some(n.index) == self.runaway
                        && held.is_some_and(|h| h.stamp.system == n.name)
                    {
                        // The runaway's own unroutable write (nobody else may hold it, see below).
                        continue;
                    }
                    let data = n.data.get(&(key, f)).cloned().flatten();
                    match (held, best) {
                        (None, None) => {
                            if data.is_some() {
                                return Err(format!(
                                    "{at}: the system holds {}, the replica nothing",
                                    show(&data)
                                ));
                            }
                        }
                        (Some(h), Some((stamp, value))) => {
                            if h.value != *value
                                || h.stamp.hlc != stamp.hlc
                                || h.stamp.system != stamp.system
                            {
                                return Err(format!(
                                    "{at}: holds {} stamped {:?}, the greatest write is {} stamped {stamp:?}",
                                    show(&h.value),
                                    h.stamp,
                                    show(value)
                                ));
                            }
                            if h.stamp.system != n.name && h.stamp.rank != stamp.rank {
                                return Err(format!(
                                    "{at}: rank {} instead of {}",
                                    h.stamp.rank, stamp.rank
                                ));
                            }
                            // A record only a system that may not create records wrote is
                            // kept (pending), not shown, until one that may creates it.
                            let live = n.records.get(&key).is_some_and(|r| r.live);
                            if !live {
                                if data.is_some() {
                                    return Err(format!(
                                        "{at}: the system holds {} of a record it does not have",
                                        show(&data)
                                    ));
                                }
                                continue;
                            }
                            if h.pending {
                                return Err(format!("{at}: still pending"));
                            }
                            if data != *value {
                                return Err(format!(
                                    "{at}: the system holds {}, the replica {}",
                                    show(&data),
                                    show(value)
                                ));
                            }
                        }
                        // Its own write that no owner ever wrote over (the router rejected it, and
                        // every owner's write was dead-lettered): nobody else holds anything.
                        (Some(h), None) if h.stamp.system == n.name => {}
                        (h, b) => return Err(format!("{at}: holds {h:?}, greatest write {b:?}")),
                    }
                }
            }
        }
        if let Some(r) = self.runaway {
            let name = &self.nodes[r].name;
            if s.dead_letters == 0 && self.best.values().any(|(st, _)| &st.system == name) {
                return Err("the runaway was never dead-lettered".into());
            }
            for n in &self.nodes {
                let holds_runaways = n.records.values().any(|rec| {
                    rec.fields
                        .values()
                        .filter_map(|h| h.winner.as_ref())
                        .any(|w| &w.stamp.system == name)
                });
                if holds_runaways && n.index != r {
                    return Err(format!("{} holds a write of the runaway {name}", n.name));
                }
            }
        }
        Ok(())
    }
}

/// An encoded field value, readable.
fn show(v: &Option<Vec<u8>>) -> String {
    match v {
        None => "(cleared)".into(),
        Some(b) => format!("{:?}", String::from_utf8_lossy(b)),
    }
}

/// Runs `count` schedules from `first_seed`; `policy_for` gives each seed its policy.
fn run_many(
    first_seed: u64,
    count: u64,
    cfg: Config,
    policy_for: impl Fn(u64) -> (Policy, String),
) -> Stats {
    let mut total = Stats::default();
    for seed in first_seed..first_seed + count {
        let (policy, text) = policy_for(seed);
        let mut sim = Sim::new(&policy, cfg, seed);
        if let Err(e) = sim.run() {
            panic!("schedule failed: seed {seed}, {cfg:?}\n{e}\npolicy:\n{text}");
        }
        let s = sim.stats;
        total.published += s.published;
        total.router_inputs += s.router_inputs;
        total.router_duplicates += s.router_duplicates;
        total.dead_letters += s.dead_letters;
        total.deliveries += s.deliveries;
        total.delivery_duplicates += s.delivery_duplicates;
        total.crashes += s.crashes;
        total.overruled += s.overruled;
        total.rejected_fields += s.rejected_fields;
        total.deletes += s.deletes;
        total.cleared += s.cleared;
        total.echoes += s.echoes;
        total.superseded += s.superseded;
    }
    eprintln!("{count} schedules from seed {first_seed}: {total:?}");
    total
}

fn seed_policy_for(_: u64) -> (Policy, String) {
    (seed_policy(), SEED_POLICY.to_owned())
}

fn random_policy_for(seed: u64) -> (Policy, String) {
    let mut rng = Rng::new(seed ^ 0x5eed_0f90_1c00_u64);
    let spec = PolicySpec::random(&mut rng, 8);
    (spec.load(), spec.to_toml())
}

/// The schedules exercise what they claim to (guards against a vacuous pass).
fn assert_exercised(s: &Stats) {
    assert!(
        s.router_duplicates > 0 && s.delivery_duplicates > 0,
        "{s:?}"
    );
    assert!(
        s.crashes > 0 && s.overruled > 0 && s.rejected_fields > 0,
        "{s:?}"
    );
    assert!(s.deliveries > s.router_inputs, "{s:?}");
    assert!(s.echoes > 0 && s.superseded > 0, "{s:?}");
}

#[test]
fn seed_policy_converges() {
    let s = run_many(0, 1_000, Config::default(), seed_policy_for);
    assert_exercised(&s);
    assert_eq!(s.dead_letters, 0);
}

#[test]
fn random_policies_converge() {
    let s = run_many(1_000_000, 1_000, Config::default(), random_policy_for);
    assert_exercised(&s);
    assert_eq!(s.dead_letters, 0);
}

/// Deletes interleaved with concurrent edits, delayed, reordered and duplicated, and no final
/// round to paper over them: every replica ends with the same records (those deleted stay
/// deleted, or hold only what was written after the delete).
#[test]
fn deletes_and_concurrent_edits_converge() {
    let cfg = Config {
        delete_per_mille: 150,
        final_round: false,
        ..Config::default()
    };
    let s = run_many(4_000_000, 1_000, cfg, seed_policy_for);
    assert!(s.deletes > 0 && s.cleared > 0, "{s:?}");
    let s = run_many(5_000_000, 1_000, cfg, random_policy_for);
    assert!(s.deletes > 0 && s.cleared > 0, "{s:?}");
}

#[test]
fn runaway_clock_is_dead_lettered_and_never_wins() {
    let cfg = Config {
        runaway: true,
        ..Config::default()
    };
    let s = run_many(2_000_000, 150, cfg, seed_policy_for);
    assert!(s.dead_letters > 0, "{s:?}");
    let s = run_many(3_000_000, 150, cfg, random_policy_for);
    assert!(s.dead_letters > 0, "{s:?}");
}

/// The checker is not vacuous: a replica that stores its non-owned (router-rejected) local
/// writes keeps them against later owner writes stamped by a slower clock, and the simulation
/// finds that within a few schedules.
#[test]
fn ignoring_receiver_ranks_is_caught() {
    let cfg = Config {
        ignore_receiver_ranks: true,
        ..Config::default()
    };
    let policy = seed_policy();
    let first = (0..200).find(|seed| Sim::new(&policy, cfg, *seed).run().is_err());
    assert!(
        first.is_some(),
        "no schedule exposed an adapter that ignores its ranks"
    );
    eprintln!("ignoring receiver ranks diverges first at seed {first:?}");
}

/// The non-owner case step by step, on the seed policy: support's user renames a customer
/// (sales owns `name`) on a machine whose clock runs a minute ahead. The router rejects the
/// change; support's adapter stored it (it does not know the policy); sales' next write, stamped
/// by a slower clock, still replaces it: sales' write carries rank 1, and support ranks its own
/// write with the rank the router told it for `name`, 0.
#[test]
fn rejected_local_write_is_overwritten_by_the_next_owner_write() {
    let policy = seed_policy();
    let settings = RouterSettings::default();
    let name = field("name");
    let value = |v: &str| {
        let mut m = DynamicMessage::new(customer());
        m.set_field(&name, prost_reflect::Value::String(v.into()));
        m
    };
    // Support's local edit, with a clock 60 s ahead: a new value, published...
    let mut support = Hlc::default();
    let local = value::encode_field(&value("Typo Corrected"), &name);
    assert_eq!(
        classify_local(None, local.as_deref(), "support", 0),
        LocalWrite::Publish
    );
    let fast = support.tick(NOW_MS + 60_000);
    let ev = event(
        "support",
        &["name"],
        value("Typo Corrected").encode_to_vec(),
        fast,
    );
    let out = route::process(
        &policy,
        &settings,
        NOW_MS,
        Input {
            routing_key: "support.customer",
            body: &ev.encode_to_vec(),
            user_id: Some("support"),
            concord_key: None,
        },
    );
    // ...and rejected: nobody receives it.
    let Outcome::Routed(r) = out else {
        panic!("{out:?}")
    };
    assert_eq!((r.accepted, r.deliveries.len()), (0, 0));
    assert_eq!(r.rejected[0].reason.as_str(), "not_owner");

    // Sales writes the name later in real time, with a correct clock: the router stamps it with
    // sales' rank for `name` (1) and tells support its own (0).
    let owners_write = event(
        "orders",
        &["name"],
        value("Ada").encode_to_vec(),
        NOW_MS << 16,
    );
    let out = route::process(
        &policy,
        &settings,
        NOW_MS,
        Input {
            routing_key: "orders.customer",
            body: &owners_write.encode_to_vec(),
            user_id: Some("orders"),
            concord_key: None,
        },
    );
    let Outcome::Routed(r) = out else {
        panic!("{out:?}")
    };
    let to_support = r.deliveries.iter().find(|d| d.system == "support").unwrap();
    let copy = ChangeEvent::decode(to_support.body.as_slice()).unwrap();
    let clock = &copy.clocks["name"];
    let sales = Stamp::new(clock.rank, clock.hlc, clock.system.clone());
    assert_eq!(sales.rank, 1);
    let own_rank = copy.receiver_ranks.get("name").copied().unwrap_or(0);
    assert_eq!(own_rank, 0);
    let stored_rejected = FieldState {
        value: local.clone(),
        stamp: Stamp::new(0, fast, "support"),
        pending: false,
    };
    assert!(incoming_wins(
        Some(&stored_rejected),
        &sales,
        "support",
        own_rank
    ));
    // Once support holds sales' value, its user's next edit of `name` is overruled locally
    // (written back), not published.
    let held = FieldState {
        value: value::encode_field(&value("Ada"), &name),
        stamp: sales,
        pending: false,
    };
    assert_eq!(
        classify_local(Some(&held), local.as_deref(), "support", own_rank),
        LocalWrite::Overruled
    );
}
