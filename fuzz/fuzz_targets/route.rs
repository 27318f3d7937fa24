//! Fuzzes the router's whole per-message work (decode, validate, decide, project, re-encode)
//! with the seed policy: it must never panic; no projection may carry a field its target may
//! not see; every clock and record clock routed is within the skew of the router's clock; a
//! routed `derived_from` is an event id; `receiver_ranks` name only fields of the copy, with the
//! receiver's own rank from the policy.
#![no_main]

use std::sync::OnceLock;

use concord_policy::route::{Input, Outcome, RouterSettings, process};
use concord_policy::Policy;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const KEYS: [&str; 6] = [
    "orders.customer",
    "support.customer",
    "delivery.customer",
    "orders.invoice",
    "billing.customer",
    "",
];

fn policy() -> &'static Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| {
        // The seed schema, compiled into the seed model crate (the library knows no entity).
        let pool = prost_reflect::DescriptorPool::decode(concord_seed_model::FILE_DESCRIPTOR_SET)
            .unwrap_or_else(|e| panic!("seed schema: {e}"));
        Policy::from_toml(concord_seed_model::POLICY, "policy.toml", &pool)
            .unwrap_or_else(|e| panic!("seed policy: {e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let routing_key = KEYS[usize::from(selector) % KEYS.len()];
    // Mostly published by the routing key's system; sometimes by nobody, or by another user.
    let publisher = routing_key.split('.').next().unwrap_or("");
    let user_id = match selector >> 6 {
        0 => None,
        1 => Some("support"),
        _ => Some(publisher),
    };
    let settings = RouterSettings {
        check_key_header: selector & 0x20 != 0,
        ..RouterSettings::default()
    };
    let now_ms = 1_800_000_000_000;
    let limit = (now_ms + settings.clock_skew_ms) << 16 | 0xffff;
    let input = Input { routing_key, body, user_id, concord_key: None };
    let policy = policy();
    if let Outcome::Routed(routed) = process(policy, &settings, now_ms, input) {
        let Some(entity) = policy.entity(&routed.entity) else { panic!("routed an unknown entity") };
        for d in &routed.deliveries {
            assert_ne!(d.system, routed.source, "routed back to the source");
            let ev = concord_proto::v1::ChangeEvent::decode(d.body.as_slice()).expect("projection decodes");
            let target = policy.system_id(&d.system).expect("known target");
            let visible = entity.visible_to(target);
            let record = prost_reflect::DynamicMessage::decode(entity.message.clone(), ev.record.as_slice())
                .expect("projected record decodes");
            for (field, _) in record.fields() {
                let i = entity.field_index(field.name()).expect("policy field");
                assert!(visible.contains(i), "{} leaked to {}", field.name(), d.system);
            }
            assert_eq!(record.unknown_fields().count(), 0, "unknown fields leaked");
            for name in &ev.field_mask {
                let i = entity.field_index(name).expect("policy field");
                assert!(visible.contains(i), "{name} named to {}", d.system);
            }
            for clock in ev.clocks.values().chain(ev.record_clock.as_ref()) {
                assert!(clock.hlc <= limit, "a clock beyond the skew was routed");
                assert_eq!(clock.system, routed.source, "a clock names another writer");
            }
            assert!(
                ev.derived_from.is_empty() || ev.derived_from.parse::<uuid::Uuid>().is_ok(),
                "derived_from routed unchecked"
            );
            for (name, rank) in &ev.receiver_ranks {
                assert!(ev.field_mask.contains(name), "a rank for a field not in the copy");
                let rule = &entity.fields[entity.field_index(name).expect("policy field")];
                assert_eq!(*rank, rule.rank_of(target), "not the receiver's own rank");
            }
        }
    }
});
