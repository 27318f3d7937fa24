//! Fuzzes the router's whole per-message work (decode, validate, decide, project, re-encode)
//! with the seed policy: it must never panic, and no projection may carry a field its target
//! may not see.
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
    let settings = RouterSettings::default();
    let now_ms = 1_800_000_000_000;
    let input = Input { routing_key, body, user_id: None };
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
        }
    }
});
