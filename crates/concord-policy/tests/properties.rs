//! Property tests of `route::process` over random policies (rendered as TOML and loaded like a
//! real policy file) and random events. Expectations are computed from the generated
//! specification, not from the compiled policy, and checked on the decoded projected bytes.

// Test code: a panic is how a broken fixture or a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use concord_policy::Op;
use concord_policy::route::{self, DeadLetterReason, Input, Outcome, RouterSettings};
use concord_proto::v1::{ChangeEvent, FieldClock};
use proptest::prelude::*;
use prost::Message;
use prost_reflect::DynamicMessage;

const UNKNOWN_MARKER: &str = "~unknown-field-marker~";

fn field_spec(n: usize, field: &'static str) -> impl Strategy<Value = Option<FieldSpec>> {
    (
        prop::bool::weighted(0.85),
        Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
        1..=n.min(3),
        0u8..3,
        prop::collection::vec(any::<bool>(), n),
        prop::bool::weighted(0.1),
    )
        .prop_map(move |(include, order, k, merge, vis, star)| {
            include.then(|| {
                let owners = order[..k].to_vec();
                let merge = match (k, merge) {
                    (1, 0) => None,
                    (_, 1) => Some("lww"),
                    _ => Some("priority"),
                };
                let visible = if star {
                    Visible::All
                } else {
                    Visible::Some(order[k..].iter().copied().filter(|s| vis[*s]).collect())
                };
                FieldSpec {
                    field,
                    owners,
                    merge,
                    visible,
                }
            })
        })
}

fn policy_spec() -> impl Strategy<Value = PolicySpec> {
    (1usize..=8).prop_flat_map(|n| {
        let fields: Vec<_> = CUSTOMER_FIELDS
            .iter()
            .map(|f| field_spec(n, f).boxed())
            .collect();
        (
            fields,
            prop::collection::vec(any::<bool>(), n),
            prop::collection::vec(any::<bool>(), n),
        )
            .prop_map(move |(fields, create, delete)| PolicySpec {
                systems: n,
                fields: fields.into_iter().flatten().collect(),
                create: (0..n).filter(|i| create[*i]).collect(),
                delete: (0..n).filter(|i| delete[*i]).collect(),
            })
    })
}

/// A random, well-formed event for a policy with `n` systems.
#[derive(Debug, Clone)]
struct EventSpec {
    source: usize,
    op: Op,
    /// Customer fields named in the mask.
    mask: Vec<&'static str>,
    /// Also name a field the Customer does not have.
    bogus: bool,
    /// Customer fields set in the record (some not in the mask).
    set: Vec<&'static str>,
    tag: u64,
    /// How far behind the router's clock the field clocks are.
    age_ms: u64,
    /// Add unknown fields at top level and inside the address.
    unknown: bool,
}

fn subset() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(any::<bool>(), CUSTOMER_FIELDS.len()).prop_map(|bits| {
        CUSTOMER_FIELDS
            .iter()
            .zip(bits)
            .filter(|(_, b)| *b)
            .map(|(f, _)| *f)
            .collect()
    })
}

fn event_spec(n: usize) -> impl Strategy<Value = EventSpec> {
    (
        0..n,
        prop_oneof![
            6 => Just(Op::Upsert),
            2 => Just(Op::Snapshot),
            2 => Just(Op::Create),
            2 => Just(Op::Delete)
        ],
        subset(),
        prop::bool::weighted(0.1),
        subset(),
        any::<u64>(),
        0u64..100_000_000,
        any::<bool>(),
    )
        .prop_map(
            |(source, op, mask, bogus, set, tag, age_ms, unknown)| EventSpec {
                source,
                op,
                mask,
                bogus,
                set,
                tag,
                age_ms,
                unknown,
            },
        )
}

fn case() -> impl Strategy<Value = (PolicySpec, EventSpec)> {
    policy_spec().prop_flat_map(|p| {
        let n = p.systems;
        (Just(p), event_spec(n))
    })
}

/// The fields set in the record: the unknown-field variant needs an address to hide one in.
fn set_fields(e: &EventSpec) -> Vec<&'static str> {
    let mut set = e.set.clone();
    if e.unknown && !set.contains(&"address") {
        set.push("address");
    }
    set
}

fn hlc_of(e: &EventSpec) -> u64 {
    ((NOW_MS - e.age_ms) << 16) | (e.tag & 0xffff)
}

fn encode(e: &EventSpec) -> Vec<u8> {
    let rec = record_with(&set_fields(e), e.tag);
    let mut bytes = prost::Message::encode_to_vec(&rec);
    if e.unknown {
        // Rebuild the address with an unknown field inside it; the later occurrence of a
        // message field is merged into the earlier one.
        let mut addr = Vec::new();
        append_unknown(&mut addr, 999, UNKNOWN_MARKER);
        push_varint(&mut bytes, 4 << 3 | 2);
        push_varint(&mut bytes, addr.len() as u64);
        bytes.extend_from_slice(&addr);
        append_unknown(&mut bytes, 999, UNKNOWN_MARKER);
    }
    let hlc = hlc_of(e);
    let mut mask: Vec<&str> = e.mask.clone();
    if e.bogus {
        mask.push("bogus_field");
    }
    let mut ev = event(&sys(e.source), &mask, bytes, hlc);
    ev.op = e.op.to_wire() as i32;
    ev.record_clock = Some(clock(hlc, &sys(e.source)));
    ev.encode_to_vec()
}

/// What the specification says about a field.
struct Oracle<'a>(&'a PolicySpec);

impl Oracle<'_> {
    fn rule(&self, f: &str) -> Option<&FieldSpec> {
        self.0.fields.iter().find(|x| x.field == f)
    }
    fn owns(&self, s: usize, f: &str) -> bool {
        self.rule(f).is_some_and(|r| r.owners.contains(&s))
    }
    fn sees(&self, s: usize, f: &str) -> bool {
        self.rule(f).is_some_and(|r| {
            r.owners.contains(&s)
                || match &r.visible {
                    Visible::All => true,
                    Visible::Some(v) => v.contains(&s),
                }
        })
    }
    fn rank(&self, s: usize, f: &str) -> u32 {
        match self.rule(f) {
            Some(r) => match r.owners.iter().position(|o| *o == s) {
                None => 0,
                Some(p) if r.merge == Some("priority") => (r.owners.len() - p) as u32,
                Some(_) => 1,
            },
            None => 0,
        }
    }
    fn readers(&self) -> BTreeSet<usize> {
        (0..self.0.systems)
            .filter(|s| CUSTOMER_FIELDS.iter().any(|f| self.sees(*s, f)))
            .collect()
    }
}

fn index_of(name: &str) -> usize {
    name.strip_prefix("sys")
        .and_then(|i| i.parse().ok())
        .unwrap()
}

fn check(spec: &PolicySpec, e: &EventSpec) -> Result<(), TestCaseError> {
    let policy = spec.load();
    let o = Oracle(spec);
    let body = encode(e);
    let src = sys(e.source);
    let out = route::process(
        &policy,
        &RouterSettings::default(),
        NOW_MS,
        Input::new(&format!("{src}.customer"), &body, Some(&src)),
    );
    // A mask naming more fields than the message has (every field and a bogus one) is refused
    // whole.
    let names = e.mask.len() + usize::from(e.bogus);
    if names > customer().fields().len() {
        let refused = matches!(&out, Outcome::DeadLetter(d) if d.reason == DeadLetterReason::FieldMaskTooLarge);
        prop_assert!(refused, "{out:?}");
        return Ok(());
    }
    let r = match out {
        Outcome::Routed(r) => r,
        Outcome::DeadLetter(d) => return Err(TestCaseError::fail(format!("dead letter {d:?}"))),
    };
    let unknown_names = e.bogus || e.mask.iter().any(|f| o.rule(f).is_none());
    prop_assert_eq!(r.dead_letter.is_some(), unknown_names);
    let refused = match e.op {
        Op::Create => !spec.create.contains(&e.source),
        Op::Delete => !spec.delete.contains(&e.source),
        _ => false,
    };
    let accepted: Vec<&str> = if refused || e.op == Op::Delete {
        Vec::new()
    } else {
        e.mask
            .iter()
            .copied()
            .filter(|f| o.owns(e.source, f))
            .collect()
    };
    // Every accepted field is owned by the source; the rest of the mask is rejected.
    prop_assert_eq!(r.accepted, accepted.len());
    let rejected: BTreeSet<&str> = r.rejected.iter().map(|x| x.field.as_str()).collect();
    for f in &e.mask {
        let declared = o.rule(f).is_some();
        let should_reject = !declared || refused || (e.op != Op::Delete && !o.owns(e.source, f));
        prop_assert_eq!(rejected.contains(f), should_reject, "field {}", f);
    }
    // Who receives what.
    let expected_targets: BTreeSet<usize> = if refused {
        BTreeSet::new()
    } else if e.op == Op::Delete || e.op == Op::Create {
        // A delete, and a create, go to every reader except the source (a create with the
        // fields each may see, possibly none).
        o.readers().into_iter().filter(|s| *s != e.source).collect()
    } else {
        // A target with no visible accepted field gets nothing.
        (0..spec.systems)
            .filter(|s| *s != e.source && accepted.iter().any(|f| o.sees(*s, f)))
            .collect()
    };
    let targets: BTreeSet<usize> = r.deliveries.iter().map(|d| index_of(&d.system)).collect();
    prop_assert_eq!(&targets, &expected_targets);
    prop_assert_eq!(targets.len(), r.deliveries.len(), "one delivery per target");
    prop_assert!(!targets.contains(&e.source), "delivered to the source");

    let input = record_with(&set_fields(e), e.tag);
    let raw_record = ChangeEvent::decode(body.as_slice()).unwrap().record;
    for d in &r.deliveries {
        let t = index_of(&d.system);
        // Raw bytes: no marker of a field the target cannot see, no unknown field.
        for f in CUSTOMER_FIELDS {
            if !o.sees(t, f) {
                prop_assert!(
                    !contains(&d.body, marker(f).as_bytes()),
                    "{} leaked to {}",
                    f,
                    d.system
                );
            }
        }
        prop_assert!(
            !contains(&d.body, UNKNOWN_MARKER.as_bytes()),
            "unknown field leaked"
        );
        let copy = ChangeEvent::decode(d.body.as_slice())
            .map_err(|x| TestCaseError::fail(x.to_string()))?;
        let expect_mask: Vec<&str> = {
            let mut m: Vec<&str> = accepted.iter().copied().filter(|f| o.sees(t, f)).collect();
            m.sort_unstable();
            m
        };
        prop_assert_eq!(&copy.field_mask, &expect_mask);
        prop_assert_eq!(d.fields, expect_mask.len());
        prop_assert_eq!(copy.origin.as_str(), src.as_str());
        let clock_names: Vec<&str> = copy.clocks.keys().map(String::as_str).collect();
        prop_assert_eq!(&clock_names, &expect_mask);
        for (f, c) in &copy.clocks {
            let expect = FieldClock {
                hlc: hlc_of(e),
                system: src.clone(),
                rank: o.rank(e.source, f),
            };
            prop_assert_eq!(c, &expect);
        }
        // Every delivered field the receiver owns tells it its own rank; absent means 0
        // (not an owner), and nothing outside the mask is ranked.
        let ranked: Vec<&str> = expect_mask
            .iter()
            .copied()
            .filter(|f| o.rank(t, f) != 0)
            .collect();
        let got: Vec<&str> = copy.receiver_ranks.keys().map(String::as_str).collect();
        prop_assert_eq!(&got, &ranked);
        for (f, rank) in &copy.receiver_ranks {
            prop_assert_eq!(*rank, o.rank(t, f));
        }
        // The decoded projection holds exactly the delivered fields the input set, with the
        // input's values, and no unknown field at any depth.
        let rec = DynamicMessage::decode(customer(), copy.record.as_slice())
            .map_err(|x| TestCaseError::fail(x.to_string()))?;
        prop_assert_eq!(rec.unknown_fields().count(), 0);
        for (fd, v) in rec.fields() {
            prop_assert!(
                o.sees(t, fd.name()),
                "{} invisible to {}",
                fd.name(),
                d.system
            );
            prop_assert!(
                expect_mask.contains(&fd.name()),
                "{} not in the mask",
                fd.name()
            );
            prop_assert!(input.has_field(&fd), "{} not set in the input", fd.name());
            prop_assert_eq!(v, &*input.get_field(&fd));
            if let Some(m) = v.as_message() {
                prop_assert_eq!(m.unknown_fields().count(), 0);
            }
        }
        for f in &expect_mask {
            prop_assert_eq!(
                rec.has_field(&field(f)),
                input.has_field(&field(f)),
                "field {}",
                f
            );
        }
        // Byte for byte what `project` makes of the input for this target.
        let entity = policy.entity("customer").unwrap();
        let mut target_fields = concord_policy::FieldSet::default();
        for f in &expect_mask {
            target_fields.insert(entity.field_index(f).unwrap());
        }
        let parsed = DynamicMessage::decode(customer(), raw_record.as_slice()).unwrap();
        prop_assert_eq!(
            &copy.record,
            &route::project(&parsed, entity, target_fields).encode_to_vec()
        );
        if e.op == Op::Delete {
            prop_assert!(copy.record.is_empty() && copy.field_mask.is_empty());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn projections_respect_ownership_and_visibility((spec, e) in case()) {
        check(&spec, &e)?;
    }

    #[test]
    fn generated_policies_load_and_compile_as_specified(spec in policy_spec()) {
        let policy = spec.load();
        let o = Oracle(&spec);
        let c = policy.entity("customer").unwrap();
        for s in 0..spec.systems {
            let id = policy.system_id(&sys(s)).unwrap();
            let owned: Vec<&str> = c.names(c.owned_by(id)).collect();
            let expect: Vec<&str> = c.fields.iter().map(|f| f.name.as_str()).filter(|f| o.owns(s, f)).collect();
            prop_assert_eq!(owned, expect);
            let seen: Vec<&str> = c.names(c.visible_to(id)).collect();
            let expect: Vec<&str> = c.fields.iter().map(|f| f.name.as_str()).filter(|f| o.sees(s, f)).collect();
            prop_assert_eq!(seen, expect);
        }
    }
}

fn arbitrary_settings() -> impl Strategy<Value = RouterSettings> {
    (0usize..4096, any::<u64>(), any::<bool>(), any::<bool>()).prop_map(
        |(max, skew, require, key)| RouterSettings {
            max_message_bytes: max,
            clock_skew_ms: skew,
            require_user_id: require,
            check_key_header: key,
            ..RouterSettings::default()
        },
    )
}

fn arbitrary_event() -> impl Strategy<Value = ChangeEvent> {
    let name = prop_oneof![
        Just("sys0".to_owned()),
        Just("sys1".to_owned()),
        Just("customer".to_owned()),
        ".{0,12}"
    ];
    let field = prop_oneof![
        4 => prop::sample::select(CUSTOMER_FIELDS.to_vec()).prop_map(str::to_owned),
        1 => ".{0,8}"
    ];
    let clock = (any::<u64>(), ".{0,4}", any::<u32>()).prop_map(|(hlc, system, rank)| FieldClock {
        hlc,
        system,
        rank,
    });
    (
        (
            prop_oneof![
                Just("0190b9a4-6a3e-7cc1-9a6e-1d2f3a4b5c6d".to_owned()),
                ".{0,40}"
            ],
            name.clone(),
            name,
            ".{0,6}",
            -1i32..6,
        ),
        (
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                subset().prop_map(|s| prost::Message::encode_to_vec(&record_with(&s, 7)))
            ],
            prop::collection::vec(field.clone(), 0..14),
            prop::collection::btree_map(field, clock.clone(), 0..14),
            0u32..3,
            prop::option::of(clock),
        ),
    )
        .prop_map(
            |(
                (event_id, source, entity, key, op),
                (record, field_mask, clocks, schema_version, record_clock),
            )| ChangeEvent {
                event_id,
                source,
                entity,
                key,
                op,
                record,
                field_mask,
                clocks,
                schema_version,
                record_clock,
                ..Default::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Arbitrary bytes under arbitrary routing keys and settings: an outcome, never a panic.
    #[test]
    fn never_panics_on_arbitrary_bytes(
        body in prop::collection::vec(any::<u8>(), 0..256),
        key in ".{0,24}",
        user in prop::option::of(".{0,8}"),
        settings in arbitrary_settings(),
        now in any::<u64>(),
        spec in policy_spec(),
    ) {
        let policy = spec.load();
        let _ = route::process(&policy, &settings, now, Input::new(&key, &body, user.as_deref()));
    }

    /// Structurally valid envelopes with arbitrary contents, as is and with bytes flipped or cut.
    #[test]
    fn never_panics_on_arbitrary_envelopes(
        ev in arbitrary_event(),
        flip in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
        cut in prop::option::of(any::<prop::sample::Index>()),
        now in any::<u64>(),
        spec in policy_spec(),
    ) {
        let policy = spec.load();
        let mut body = ev.encode_to_vec();
        if let (Some((at, byte)), false) = (flip, body.is_empty()) {
            let i = at.index(body.len());
            body[i] ^= byte;
        }
        if let (Some(at), false) = (cut, body.is_empty()) {
            body.truncate(at.index(body.len()));
        }
        let key = format!("{}.{}", ev.source, ev.entity);
        let settings = RouterSettings::default();
        let out = route::process(&policy, &settings, now, Input::new(&key, &body, Some(&ev.source)));
        if let Outcome::Routed(r) = out {
            // Whatever got through still respects the policy.
            let c = policy.entity("customer").unwrap();
            let source = policy.system_id(&r.source).unwrap();
            for d in &r.deliveries {
                prop_assert_ne!(&d.system, &r.source);
                let copy = ChangeEvent::decode(d.body.as_slice()).unwrap();
                let target = policy.system_id(&d.system).unwrap();
                for f in &copy.field_mask {
                    let i = c.field_index(f).unwrap();
                    prop_assert!(c.visible_to(target).contains(i) && c.owned_by(source).contains(i));
                }
            }
        }
    }
}
