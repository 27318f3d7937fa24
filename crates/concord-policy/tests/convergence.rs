//! Deterministic convergence simulation.
//!
//! N simulated systems each run the adapter logic of the pure core on their own replica
//! (`replica::classify_local` for local writes, `replica::incoming_wins` for deliveries,
//! `clock::Hlc` for stamps, `route::encode_field` for stored values) and the real
//! `route::process` routes between them. A seeded simulated broker delays, reorders and
//! duplicates messages on both legs (adapter → router and router → inbox), adapters crash between
//! recording a change as pending and applying it, and every system's wall clock has its own
//! offset and drift.
//!
//! The adapter model (what a real adapter must do, see the `replica` module docs):
//! - A local change of a field is classified against the replica. `Unchanged` publishes
//!   nothing. `Overruled` publishes nothing and writes the stored value back to the system.
//!   `Publish` fields of one change are stamped with one `Hlc::tick` and published as one event;
//!   the replica stores them all, like the real adapter, which does not know the policy. A
//!   non-owner's write is rejected by the router; the system keeps its local value until the
//!   next owner write arrives and wins (owners' writes carry rank >= 1, the replica ranks its own
//!   write 0). Once it holds an owner's value, a non-owner's edit is `Overruled` (written back).
//! - On receipt: observe every clock into the HLC, learn the own merge rank from
//!   `receiver_ranks`, record winning fields as pending, apply them to the system, clear pending,
//!   ack. Applying a value makes the system report it as a local change (the echo), through the
//!   same code path as user edits.
//!
//! The invariant checked once the broker is quiet, after a final round in which every owner
//! of every declared field writes a fresh value for every key:
//! - every system holds, for every field it can see, the value and (hlc, system) stamp of the
//!   greatest accepted write (ordered by policy rank, hlc, system; i.e. the owner's latest write
//!   for single-owner fields, the greatest stamp for lww fields, the highest-priority owner's
//!   latest write for priority fields) and the system's own copy equals it; stamps written by
//!   other systems carry the policy's rank; nothing is left pending;
//! - no replica holds a field its system cannot see;
//! - no echo amplification: applying a routed change never publishes, the number of router
//!   inputs equals the number of published local changes (broker duplicates counted apart), no
//!   event is published after the last local edit, and each input yields at most one delivery
//!   per other system.
//!
//! With deletes (`delete_per_mille`), systems allowed to delete records also delete them: the
//! deleter's replica forgets the record's fields and records the tombstone; a replica receiving
//! the delete applies `replica::Held::bury` to every field (dropping the writes made before it;
//! the system shows the greatest later write, or the field cleared, and its report of that must
//! classify as unchanged) and ignores field writes `replica::buried` under its tombstone.
//! Replicas keep `Held` shadows for every field. Those schedules skip the final round, so
//! records stay deleted or partly cleared, and the check expects, per field, the greatest
//! accepted write made after the record's newest delete (or nothing).
//!
//! In the runaway case one system's clock is beyond the router's `clock_skew_ms`: all its events
//! are dead-lettered (`clock_skew`), its writes reach no other system, and every other system
//! converges as above. (The runaway system itself keeps its own unroutable values locally.)

// Test code: a panic is how a broken fixture or a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use concord_policy::clock::Hlc;
use concord_policy::replica::{
    FieldState, Held, LocalWrite, buried, classify_local, delete_is_new, incoming_wins,
};
use concord_policy::route::{self, DeadLetterReason, Input, Outcome, RouterSettings};
use concord_policy::{EntityPolicy, FieldSet, Policy, Stamp};
use concord_proto::v1::{ChangeEvent, FieldClock};
use prost::Message;
use prost_reflect::DynamicMessage;

const KEYS: [&str; 2] = ["c-1", "c-2"];
const START_MS: u64 = NOW_MS;

#[derive(Debug, Clone, Copy)]
struct Config {
    /// Local edits before the final round.
    edits: usize,
    /// Probability (per mille) that the broker delivers a message twice.
    dup_per_mille: u64,
    /// Probability (per mille) that an adapter crashes after recording pending changes.
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
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    /// Local changes that published an event.
    published: u64,
    /// Of those, changes reported while applying a routed change (echoes): must stay 0.
    published_by_echo: u64,
    /// Events the router processed, not counting broker duplicates.
    router_inputs: u64,
    router_duplicates: u64,
    /// Events published after the last local edit (by applying routed changes).
    published_after_quiet: u64,
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
}

/// One adapter and the system behind it.
struct Node {
    name: String,
    index: usize,
    owns: FieldSet,
    sees: FieldSet,
    /// May delete records.
    deletes: bool,
    hlc: Hlc,
    offset_ms: i64,
    drift_ppm: i64,
    /// The adapter's replica: per (key, field), value and stamp.
    replica: BTreeMap<(usize, &'static str), FieldState>,
    /// The system's own data: per (key, field), the encoded value (absent = never set).
    data: BTreeMap<(usize, &'static str), Option<Vec<u8>>>,
    /// Merge ranks learned from `receiver_ranks`.
    ranks: BTreeMap<&'static str, u32>,
    /// Per key, the newest delete the replica has seen: `(hlc, system)`.
    tombstones: BTreeMap<usize, (u64, String)>,
    /// The replica's shadows per (key, field) (see `replica::Held`).
    shadows: BTreeMap<(usize, &'static str), Vec<FieldState>>,
}

impl Node {
    /// What the replica keeps of one field.
    fn held(&self, key: usize, f: &'static str) -> Held {
        Held {
            winner: self.replica.get(&(key, f)).cloned(),
            shadows: self.shadows.get(&(key, f)).cloned().unwrap_or_default(),
        }
    }

    fn keep(&mut self, key: usize, f: &'static str, held: Held) {
        match held.winner {
            Some(w) => self.replica.insert((key, f), w),
            None => self.replica.remove(&(key, f)),
        };
        if held.shadows.is_empty() {
            self.shadows.remove(&(key, f));
        } else {
            self.shadows.insert((key, f), held.shadows);
        }
    }

    fn rank(&self, f: &str) -> u32 {
        self.ranks.get(f).copied().unwrap_or(0)
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
    quiet: bool,
    stats: Stats,
}

fn field_of(name: &str) -> &'static str {
    CUSTOMER_FIELDS
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
        let nodes: Vec<Node> = policy
            .system_ids()
            .map(|id| Node {
                name: policy.system_name(id).to_owned(),
                index: id.index(),
                owns: entity.owned_by(id),
                sees: entity.visible_to(id),
                deletes: entity.delete.contains(id),
                hlc: Hlc::default(),
                offset_ms: rng.range_i64(-cfg.max_offset_ms, cfg.max_offset_ms),
                drift_ppm: rng.range_i64(-cfg.max_drift_ppm, cfg.max_drift_ppm),
                replica: BTreeMap::new(),
                data: BTreeMap::new(),
                ranks: BTreeMap::new(),
                tombstones: BTreeMap::new(),
                shadows: BTreeMap::new(),
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
            quiet: false,
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
        route::encode_field(&rec, &field(f))
    }

    /// The system `node` reports that fields of record `key` now hold `values`: the adapter's
    /// local-change path. Returns whether an event was published.
    fn local_change(
        &mut self,
        node: usize,
        key: usize,
        values: Vec<(&'static str, Option<Vec<u8>>)>,
        echo: bool,
    ) -> Result<bool, String> {
        let mut publish = Vec::new();
        for (f, value) in values {
            let n = &mut self.nodes[node];
            n.data.insert((key, f), value.clone());
            let own_rank = n.ranks.get(f).copied().unwrap_or(0);
            let stored = n.replica.get(&(key, f));
            let class = classify_local(stored, value.as_deref(), &n.name, own_rank);
            let back = stored.and_then(|s| s.value.clone());
            match class {
                LocalWrite::Unchanged => {}
                LocalWrite::Overruled => {
                    if echo {
                        return Err(format!("{}: echo of {f} classified as overruled", n.name));
                    }
                    self.stats.overruled += 1;
                    // Write the winning value back; the system reports it again (an echo).
                    self.local_change(node, key, vec![(f, back)], true)?;
                }
                LocalWrite::Publish => {
                    if echo {
                        return Err(format!(
                            "{}: echo of {f} would publish",
                            self.nodes[node].name
                        ));
                    }
                    publish.push((f, value, own_rank));
                }
            }
        }
        if publish.is_empty() {
            return Ok(false);
        }
        let wall = self.wall(node);
        let n = &mut self.nodes[node];
        let hlc = n.hlc.tick(wall);
        let mut record = DynamicMessage::new(customer());
        let mut ev = new_event(
            self.event_seq,
            &n.name,
            key,
            concord_proto::v1::Op::Upsert,
            wall,
        );
        self.event_seq += 1;
        let mut fields = Vec::new();
        for (f, value, own_rank) in publish {
            if let Some(bytes) = &value {
                let fd = field(f);
                let v = route::decode_field(&customer(), &fd, bytes).ok_or("undecodable value")?;
                record.set_field(&fd, v);
            }
            ev.field_mask.push(f.to_owned());
            ev.clocks.insert(
                f.to_owned(),
                FieldClock {
                    hlc,
                    system: n.name.clone(),
                    rank: own_rank,
                },
            );
            // Like the real adapter, every published local write is stored, also one the router
            // will reject: the adapter does not know the policy. Owners' writes carry a rank of
            // at least 1 and the replica ranks its own writes with its own rank (0 for a field it
            // does not own), so the next owner write still replaces the rejected value.
            let mut held = n.held(key, f);
            held.local(FieldState {
                value: value.clone(),
                stamp: Stamp::new(own_rank, hlc, n.name.clone()),
                pending: false,
            });
            n.keep(key, f, held);
            fields.push((f, value));
        }
        ev.record = record.encode_to_vec();
        self.ingress.push(Ingress {
            source: node,
            key,
            body: ev.encode_to_vec(),
            hlc,
            fields,
            delete: false,
            duplicate: false,
        });
        self.stats.published += 1;
        if self.quiet {
            self.stats.published_after_quiet += 1;
        }
        if echo {
            self.stats.published_by_echo += 1;
        }
        Ok(true)
    }

    /// A user of `node` deletes record `key`: the adapter's local delete path. The system
    /// drops the record; the replica forgets every field (all written before this delete) and
    /// records the tombstone; the delete is published with its record clock.
    fn local_delete(&mut self, node: usize, key: usize) {
        let wall = self.wall(node);
        let n = &mut self.nodes[node];
        let hlc = n.hlc.tick(wall);
        n.replica.retain(|(k, _), _| *k != key);
        n.shadows.retain(|(k, _), _| *k != key);
        for ((k, _), value) in n.data.iter_mut() {
            if *k == key {
                *value = None;
            }
        }
        n.tombstones.insert(key, (hlc, n.name.clone()));
        let ev = ChangeEvent {
            record_clock: Some(FieldClock {
                hlc,
                system: n.name.clone(),
                rank: 0,
            }),
            ..new_event(
                self.event_seq,
                &n.name,
                key,
                concord_proto::v1::Op::Delete,
                wall,
            )
        };
        self.event_seq += 1;
        self.ingress.push(Ingress {
            source: node,
            key,
            body: ev.encode_to_vec(),
            hlc,
            fields: Vec::new(),
            delete: true,
            duplicate: false,
        });
        self.stats.published += 1;
        self.stats.deletes += 1;
    }

    /// A user of `node` edits 1..=3 fields of a random record, or deletes it.
    fn random_edit(&mut self, node: usize) -> Result<(), String> {
        let key = self.rng.below(KEYS.len());
        if self.nodes[node].deletes && self.rng.chance(self.cfg.delete_per_mille, 1000) {
            self.local_delete(node, key);
            return Ok(());
        }
        let owned: Vec<&'static str> = CUSTOMER_FIELDS
            .iter()
            .copied()
            .filter(|f| self.owns(node, f))
            .collect();
        let seen: Vec<&'static str> = CUSTOMER_FIELDS
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
                &CUSTOMER_FIELDS
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
        self.local_change(node, key, values, false)?;
        Ok(())
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
        let record =
            DynamicMessage::decode(customer(), ev.record.as_slice()).map_err(|e| e.to_string())?;
        let key = KEYS
            .iter()
            .position(|k| *k == ev.key)
            .ok_or("unknown key")?;
        if ev.op == concord_proto::v1::Op::Delete as i32 {
            return self.deliver_delete(t, key, &ev);
        }
        let tombstone = self.nodes[t].tombstones.get(&key).cloned();
        let mut winners = Vec::new();
        for name in &ev.field_mask {
            let f = field_of(name);
            if !self.sees(t, f) {
                return Err(format!(
                    "{} received {f}, which it cannot see",
                    self.nodes[t].name
                ));
            }
            let c = ev.clocks.get(name).ok_or("delivery without a clock")?;
            let n = &mut self.nodes[t];
            n.hlc.observe(c.hlc);
            if !self.cfg.ignore_receiver_ranks {
                // A field of the mask without an entry has rank 0.
                let r = ev.receiver_ranks.get(name).copied().unwrap_or(0);
                n.ranks.insert(f, r);
            }
            let self_rank = n.ranks.get(f).copied().unwrap_or(0);
            let incoming = Stamp::new(c.rank, c.hlc, c.system.clone());
            if buried(
                c.hlc,
                &c.system,
                tombstone.as_ref().map(|(h, s)| (*h, s.as_str())),
            ) {
                continue; // written before the record's delete
            }
            let value = route::encode_field(&record, &field(f));
            let mut held = n.held(key, f);
            let incoming = FieldState {
                value: value.clone(),
                stamp: incoming,
                pending: true,
            };
            if held.receive(incoming, &n.name, self_rank) {
                winners.push((f, value));
            }
            n.keep(key, f, held);
        }
        if !winners.is_empty() && msg.crashes < 2 && self.rng.chance(self.cfg.crash_per_mille, 1000)
        {
            // Crash after recording pending, before applying and acking: the broker redelivers.
            self.stats.crashes += 1;
            self.inbox.push(InboxMsg {
                crashes: msg.crashes + 1,
                ..msg
            });
            return Ok(());
        }
        for (f, _) in &winners {
            if let Some(s) = self.nodes[t].replica.get_mut(&(key, *f)) {
                s.pending = false;
            }
        }
        // Apply to the system, which reports the change back like any local change.
        if !winners.is_empty() && self.local_change(t, key, winners, true)? {
            return Err("applying a routed change published an event".into());
        }
        Ok(())
    }

    /// A routed delete reaches `t`: every field drops the writes made before it; the system
    /// shows what each changed field keeps (the greatest later write, or nothing) and reports it
    /// back like any local change, which must classify as unchanged.
    fn deliver_delete(&mut self, t: usize, key: usize, ev: &ChangeEvent) -> Result<(), String> {
        let rc = ev
            .record_clock
            .as_ref()
            .ok_or("a delete without record_clock")?;
        let n = &mut self.nodes[t];
        n.hlc.observe(rc.hlc);
        let tombstone = n.tombstones.get(&key).map(|(h, s)| (*h, s.as_str()));
        let delete = (rc.hlc, rc.system.as_str());
        if !delete_is_new(tombstone, delete) {
            return Ok(());
        }
        let mut fields: Vec<&'static str> = n
            .replica
            .keys()
            .chain(n.shadows.keys())
            .filter(|(k, _)| *k == key)
            .map(|(_, f)| *f)
            .collect();
        fields.sort_unstable();
        fields.dedup();
        // What the system now shows for each field whose winner changed: cleared, or a later
        // write the delete brought back.
        let mut clears = Vec::new();
        for f in fields {
            let mut held = n.held(key, f);
            if held.bury(delete, &n.name, n.rank(f)) {
                clears.push((f, held.winner.as_ref().and_then(|w| w.value.clone())));
            }
            n.keep(key, f, held);
        }
        n.tombstones.insert(key, (rc.hlc, rc.system.clone()));
        self.stats.cleared += clears.len() as u64;
        if self.local_change(t, key, clears, true)? {
            return Err("applying a routed delete published an event".into());
        }
        Ok(())
    }

    /// Delivers one in-flight message, if any.
    fn pump(&mut self) -> Result<bool, String> {
        match (self.ingress.is_empty(), self.inbox.is_empty()) {
            (true, true) => Ok(false),
            (false, true) => self.route_one().map(|_| true),
            (true, false) => self.deliver_one().map(|_| true),
            (false, false) => {
                if self.rng.chance(1, 2) {
                    self.route_one()?;
                } else {
                    self.deliver_one()?;
                }
                Ok(true)
            }
        }
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
        // Quiet: no more local edits; drain the broker.
        self.quiet = true;
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
            self.local_change(node, key, vec![(f, v)], false)?;
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
        if s.published_after_quiet != 0 {
            return Err(format!(
                "{} events published after the last edit",
                s.published_after_quiet
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
                for f in CUSTOMER_FIELDS {
                    let at = format!("{} {key_name} {f}", n.name);
                    let held = n.replica.get(&(key, f));
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
                            .filter(|(stamp, _)| !buried(stamp.hlc, &stamp.system, deleted))
                            .max_by(|a, b| a.0.cmp(&b.0))
                    });
                    if Some(n.index) == self.runaway
                        && held.is_some_and(|h| h.stamp.system == n.name)
                    {
                        // The runaway's own unroutable write (nobody else may hold it, see below).
                        continue;
                    }
                    match (held, best) {
                        (None, None) => {
                            let data = n.data.get(&(key, f)).cloned().flatten();
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
                            if h.pending {
                                return Err(format!("{at}: still pending"));
                            }
                            let data = n.data.get(&(key, f)).cloned().flatten();
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
                if n.replica
                    .values()
                    .any(|v| &v.stamp.system == name && n.index != r)
                {
                    return Err(format!("{} holds a write of the runaway {name}", n.name));
                }
            }
        }
        Ok(())
    }
}

/// The envelope of the `seq`-th event of the run, published by `source` at `wall`.
fn new_event(
    seq: u128,
    source: &str,
    key: usize,
    op: concord_proto::v1::Op,
    wall: u64,
) -> ChangeEvent {
    ChangeEvent {
        event_id: uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | seq)
            .to_string(),
        source: source.to_owned(),
        entity: "customer".into(),
        key: KEYS[key].into(),
        op: op as i32,
        schema_version: concord_proto::SCHEMA_VERSION,
        observed_at_ms: wall,
        ..Default::default()
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
    let local = route::encode_field(&value("Typo Corrected"), &name);
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
        value: route::encode_field(&value("Ada"), &name),
        stamp: sales,
        pending: false,
    };
    assert_eq!(
        classify_local(Some(&held), local.as_deref(), "support", own_rank),
        LocalWrite::Overruled
    );
}
