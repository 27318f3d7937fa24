//! The routed copies of an input: one `ChangeEvent` per target system, encoded straight from the
//! decoded input and the target's projection of the record.

use concord_proto::v1::ChangeEvent;

use super::Delivery;
use super::project::Projector;
use crate::decide::Verdict;
use crate::model::{EntityPolicy, Policy};
use crate::sets::{FieldSet, SystemId};

/// The deliveries of one input from `source`: for each target of `verdict`, its routed copy
/// carrying the `changed` fields it may see, projected by `projector` (`None` when nothing
/// was accepted). With `only`, the copy for that one system (a resync), if it gets any.
#[allow(clippy::too_many_arguments)]
pub(super) fn deliveries(
    policy: &Policy,
    entity: &EntityPolicy,
    ev: &ChangeEvent,
    source: SystemId,
    verdict: &Verdict,
    changed: FieldSet,
    projector: Option<&Projector>,
    only: Option<SystemId>,
) -> Vec<Delivery> {
    let clocks = changed_clocks(ev, entity, changed);
    let mut deliveries: Vec<Delivery> = Vec::new();
    // Targets that receive the same fields with the same own ranks get identical bytes: encode
    // each distinct projection once (`shapes[i]` describes `deliveries[i]`).
    let mut shapes: Vec<(FieldSet, Vec<u32>)> = Vec::new();
    for (target, fields) in verdict.deliveries(entity) {
        if only.is_some_and(|t| t != target) {
            continue;
        }
        let ranks: Vec<u32> = fields
            .iter()
            .map(|i| entity.fields.get(i).map_or(0, |rule| rule.rank_of(target)))
            .collect();
        let body = match shapes.iter().position(|(f, r)| *f == fields && *r == ranks) {
            Some(same) => deliveries
                .get(same)
                .map(|d| d.body.clone())
                .unwrap_or_default(),
            None => {
                let record = projector
                    .map(|p| p.projection(entity, fields))
                    .unwrap_or_default();
                let copy = RoutedCopy {
                    ev,
                    entity,
                    source,
                    target,
                    fields,
                    record: &record,
                    clocks: &clocks,
                };
                copy.encode()
            }
        };
        deliveries.push(Delivery {
            system: policy.system_name(target).to_owned(),
            fields: fields.len(),
            body,
        });
        shapes.push((fields, ranks));
    }
    deliveries
}

/// The clocks of the `changed` fields of `ev` in name order (the order the copies' maps encode
/// in), with their field index: shared by every copy of one input.
fn changed_clocks<'a>(
    ev: &'a ChangeEvent,
    entity: &EntityPolicy,
    changed: FieldSet,
) -> Vec<(&'a str, u64, usize)> {
    ev.clocks
        .iter()
        .filter_map(|(name, c)| {
            let i = entity.field_index(name)?;
            changed.contains(i).then_some((name.as_str(), c.hlc, i))
        })
        .collect()
}

/// One routed copy of an input, encoded straight from the decoded input: the bytes are exactly
/// `ChangeEvent::encode_to_vec` of the copy (see the tests), without building the copy's maps
/// and strings first.
///
/// The copy carries the input's identity, the projected record, the mask and clocks of
/// `fields` (each clock re-stamped with the source as writer and the source's rank: a publisher
/// cannot impersonate another writer or choose a rank), the record clock likewise, and the
/// receiver's own non-zero ranks (absent means 0).
struct RoutedCopy<'a> {
    ev: &'a ChangeEvent,
    entity: &'a EntityPolicy,
    source: SystemId,
    target: SystemId,
    fields: FieldSet,
    record: &'a [u8],
    /// The input's clocks of changed fields, in name order, with their field index.
    clocks: &'a [(&'a str, u64, usize)],
}

impl RoutedCopy<'_> {
    fn encode(&self) -> Vec<u8> {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

        fn len_field(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(bytes.len() as u64, buf);
            buf.extend_from_slice(bytes);
        }
        // A proto3 string/bytes field: omitted when empty.
        fn implicit(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
            if !bytes.is_empty() {
                len_field(tag, bytes, buf);
            }
        }
        fn varint_field(tag: u32, value: u64, buf: &mut Vec<u8>) {
            if value != 0 {
                encode_key(tag, WireType::Varint, buf);
                encode_varint(value, buf);
            }
        }
        fn varint_len(tag: u32, value: u64) -> usize {
            if value == 0 {
                0
            } else {
                key_len(tag) + encoded_len_varint(value)
            }
        }
        fn str_len(tag: u32, s: &str) -> usize {
            if s.is_empty() {
                0
            } else {
                key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
            }
        }
        // `FieldClock { hlc, system, rank }` as a length-delimited field `tag`.
        fn clock(tag: u32, hlc: u64, system: &str, rank: u32, buf: &mut Vec<u8>) {
            let len = varint_len(1, hlc) + str_len(2, system) + varint_len(3, u64::from(rank));
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(len as u64, buf);
            varint_field(1, hlc, buf);
            implicit(2, system.as_bytes(), buf);
            varint_field(3, u64::from(rank), buf);
        }
        fn clock_len(tag: u32, hlc: u64, system: &str, rank: u32) -> usize {
            let len = varint_len(1, hlc) + str_len(2, system) + varint_len(3, u64::from(rank));
            key_len(tag) + encoded_len_varint(len as u64) + len
        }

        let ev = self.ev;
        let source = ev.source.as_str();
        let mut buf = Vec::with_capacity(
            ev.event_id.len()
                + 2 * source.len()
                + ev.entity.len()
                + ev.key.len()
                + ev.derived_from.len()
                + self.record.len()
                + self.clocks.len() * (2 * 24 + source.len())
                + 64,
        );
        implicit(1, ev.event_id.as_bytes(), &mut buf);
        implicit(2, source.as_bytes(), &mut buf);
        implicit(3, ev.entity.as_bytes(), &mut buf);
        implicit(4, ev.key.as_bytes(), &mut buf);
        // The enum as int32: negative values are sign-extended to 64 bits on the wire.
        varint_field(5, i64::from(ev.op) as u64, &mut buf);
        implicit(6, self.record, &mut buf);
        for i in self.fields.iter() {
            if let Some(rule) = self.entity.fields.get(i) {
                len_field(7, rule.name.as_bytes(), &mut buf);
            }
        }
        let in_copy = |&&(_, _, i): &&(&str, u64, usize)| self.fields.contains(i);
        let rank = |i: usize, system: SystemId| {
            self.entity
                .fields
                .get(i)
                .map_or(0, |rule| rule.rank_of(system))
        };
        // map<string, FieldClock> clocks = 8: one entry (key = 1, value = 2) per field.
        for &(name, hlc, i) in self.clocks.iter().filter(in_copy) {
            let source_rank = rank(i, self.source);
            let len = str_len(1, name) + clock_len(2, hlc, source, source_rank);
            encode_key(8, WireType::LengthDelimited, &mut buf);
            encode_varint(len as u64, &mut buf);
            implicit(1, name.as_bytes(), &mut buf);
            clock(2, hlc, source, source_rank, &mut buf);
        }
        implicit(9, ev.derived_from.as_bytes(), &mut buf);
        varint_field(10, u64::from(concord_proto::SCHEMA_VERSION), &mut buf);
        implicit(11, source.as_bytes(), &mut buf);
        varint_field(12, ev.observed_at_ms, &mut buf);
        if let Some(c) = &ev.record_clock {
            clock(13, c.hlc, source, 0, &mut buf);
        }
        // map<string, uint32> receiver_ranks = 14: the receiver's non-zero ranks.
        for &(name, _, i) in self.clocks.iter().filter(in_copy) {
            let own = rank(i, self.target);
            if own != 0 {
                let len = str_len(1, name) + varint_len(2, u64::from(own));
                encode_key(14, WireType::LengthDelimited, &mut buf);
                encode_varint(len as u64, &mut buf);
                implicit(1, name.as_bytes(), &mut buf);
                varint_field(2, u64::from(own), &mut buf);
            }
        }
        // bool may_create = 15: the source is in the entity's `create` list.
        varint_field(
            15,
            u64::from(self.entity.create.contains(self.source)),
            &mut buf,
        );
        buf
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;

    use concord_proto::v1::FieldClock;
    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    const POLICY: &str = r#"
        [systems.orders]
        [systems.support]
        [systems.delivery]
        [entities.customer]
        message = "seed.v1.Customer"
        [entities.customer.fields]
        name = { owner = "orders", visible = ["*"] }
        email = { owners = ["orders", "support"], merge = "lww", visible = ["*"] }
        phone = { owners = ["support", "orders", "delivery"], merge = "priority", visible = ["*"] }
        tier = { owner = "support", visible = ["*"] }
        warehouse = { owner = "delivery", visible = ["orders"] }
        language = { owners = ["delivery", "orders"], merge = "priority", visible = ["*"] }
    "#;

    /// The copy as a `ChangeEvent` value, the way the router described copies before encoding
    /// them directly: `RoutedCopy::encode` must produce exactly its prost encoding.
    fn reference(copy: &RoutedCopy<'_>) -> Vec<u8> {
        let ev = copy.ev;
        let mut out = ChangeEvent {
            event_id: ev.event_id.clone(),
            source: ev.source.clone(),
            entity: ev.entity.clone(),
            key: ev.key.clone(),
            op: ev.op,
            record: copy.record.to_vec(),
            field_mask: Vec::new(),
            clocks: BTreeMap::new(),
            derived_from: ev.derived_from.clone(),
            schema_version: concord_proto::SCHEMA_VERSION,
            origin: ev.source.clone(),
            observed_at_ms: ev.observed_at_ms,
            record_clock: ev.record_clock.as_ref().map(|c| FieldClock {
                hlc: c.hlc,
                system: ev.source.clone(),
                rank: 0,
            }),
            receiver_ranks: BTreeMap::new(),
            may_create: copy.entity.create.contains(copy.source),
        };
        for i in copy.fields.iter() {
            let rule = &copy.entity.fields[i];
            out.field_mask.push(rule.name.clone());
            if let Some(c) = ev.clocks.get(&rule.name) {
                out.clocks.insert(
                    rule.name.clone(),
                    FieldClock {
                        hlc: c.hlc,
                        system: ev.source.clone(),
                        rank: rule.rank_of(copy.source),
                    },
                );
            }
            let own = rule.rank_of(copy.target);
            if own != 0 {
                out.receiver_ranks.insert(rule.name.clone(), own);
            }
        }
        out.encode_to_vec()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn direct_encoding_equals_the_prost_encoding_of_the_copy(
            event_id in "[a-z0-9-]{0,40}",
            source in 0usize..3,
            target in 0usize..3,
            key in "\\PC{0,12}",
            op in -3i32..6,
            record in proptest::collection::vec(any::<u8>(), 0..40),
            derived_from in "[a-z0-9-]{0,8}",
            observed_at_ms in prop_oneof![Just(0u64), any::<u64>()],
            record_clock in proptest::option::of((prop_oneof![Just(0u64), any::<u64>()], "[a-z]{0,5}")),
            hlcs in proptest::collection::vec(prop_oneof![Just(0u64), any::<u64>()], 6),
            in_mask in any::<u8>(),
            in_copy in any::<u8>(),
        ) {
            let policy = Policy::from_toml(POLICY, "policy.toml", &crate::seed_pool()).unwrap();
            let entity = policy.entity("customer").unwrap();
            let systems = ["orders", "support", "delivery"];
            let mut ev = ChangeEvent {
                event_id,
                source: systems[source].to_owned(),
                entity: "customer".to_owned(),
                key,
                op,
                derived_from,
                observed_at_ms,
                record_clock: record_clock.map(|(hlc, system)| FieldClock { hlc, system, rank: 7 }),
                ..Default::default()
            };
            let mut changed = FieldSet::default();
            for (i, rule) in entity.fields.iter().enumerate() {
                if in_mask & (1 << i) != 0 {
                    changed.insert(i);
                    ev.clocks.insert(
                        rule.name.clone(),
                        FieldClock { hlc: hlcs[i], system: "forged".into(), rank: 9 },
                    );
                }
            }
            // A clock for something that is not a field is ignored.
            ev.clocks.insert("zzz".into(), FieldClock::default());
            let mut fields = FieldSet::default();
            for i in changed.iter() {
                if in_copy & (1 << i) != 0 {
                    fields.insert(i);
                }
            }
            let clocks = changed_clocks(&ev, entity, changed);
            let copy = RoutedCopy {
                ev: &ev,
                entity,
                source: policy.system_id(systems[source]).unwrap(),
                target: policy.system_id(systems[target]).unwrap(),
                fields,
                record: &record,
                clocks: &clocks,
            };
            prop_assert_eq!(copy.encode(), reference(&copy));
        }
    }
}
