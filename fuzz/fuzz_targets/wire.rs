//! Fuzzes the wire-level record projection against the reflective one it replaces on the hot
//! path: whenever the fast path answers, the record must decode and every projection must be
//! byte-identical to decoding, projecting and re-encoding it through prost-reflect.
#![no_main]

use std::sync::OnceLock;

use concord_policy::route::project;
use concord_policy::{FieldSet, Policy, bench_filter};
use libfuzzer_sys::fuzz_target;
use prost::Message;

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
    // Two bytes choose the accepted fields, the rest is the record.
    let Some((mask, record)) = data.split_at_checked(2) else { return };
    let entity = policy().entity("customer").expect("seed policy has customer");
    let bits = u16::from_le_bytes([mask[0], mask[1]]);
    let mut accepted = FieldSet::default();
    for i in 0..entity.fields.len().min(16) {
        if bits & (1 << i) != 0 {
            accepted.insert(i);
        }
    }
    let Some(fast) = bench_filter(entity, record, accepted) else { return };
    let decoded = prost_reflect::DynamicMessage::decode(entity.message.clone(), record)
        .expect("the fast path answered for a record that does not decode");
    let reflective = project(&decoded, entity, accepted).encode_to_vec();
    assert_eq!(fast, reflective, "fast and reflective projections differ");
});
