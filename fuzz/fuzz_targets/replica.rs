//! Fuzzes the adapter's rules (`replica::Replica`) with arbitrary routed copies of one record —
//! forged clocks, record clocks, ranks (`receiver_ranks`), ops and values — and local edits in
//! between: it must never panic, never adopt a clock beyond twice the skew of its wall clock,
//! never plan to apply a field its schema does not have, and never plan to create a record from
//! a copy that may not create it when the record never existed here.
#![no_main]

use std::sync::OnceLock;

use concord_policy::replica::{
    Echoes, IncomingStep, LocalEdit, LocalOp, Ranks, RecordState, Replica, decode_copy,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use prost_reflect::MessageDescriptor;

fn customer() -> &'static MessageDescriptor {
    static M: OnceLock<MessageDescriptor> = OnceLock::new();
    M.get_or_init(|| {
        let pool = prost_reflect::DescriptorPool::decode(concord_seed_model::FILE_DESCRIPTOR_SET)
            .unwrap_or_else(|e| panic!("seed schema: {e}"));
        pool.get_message_by_name("seed.v1.Customer")
            .unwrap_or_else(|| panic!("no Customer"))
    })
}

const NOW_MS: u64 = 1_800_000_000_000;
const SKEW_MS: u64 = 60_000;

fuzz_target!(|data: &[u8]| {
    let message = customer();
    let mut replica = Replica::new("sys", Echoes::Reported, 3_600_000, 0).with_clock_skew(SKEW_MS);
    let (mut state, mut ranks) = (RecordState::default(), Ranks::new());
    let limit = (NOW_MS + 2 * SKEW_MS) << 16 | 0xffff;
    // Chunks: a length byte, then a routed copy (or, for an empty chunk, a local edit).
    let mut rest = data;
    let mut step = 0u64;
    while let Some((&len, tail)) = rest.split_first() {
        let (chunk, next) = tail.split_at(usize::from(len).min(tail.len()));
        rest = next;
        step += 1;
        let now = NOW_MS + step;
        if chunk.is_empty() {
            let edit = LocalEdit {
                op: LocalOp::Upsert,
                local_id: "l-1".into(),
                fields: vec![("name".into(), Some(vec![10, 1, b'a']))],
                version: None,
                snapshot: false,
            };
            let out = replica.local(&mut state, &ranks, &edit, now);
            if let Some(p) = out.publish {
                assert!(p.hlc <= limit, "a local write stamped beyond the skew");
            }
            continue;
        }
        let Ok(ev) = concord_proto::v1::ChangeEvent::decode(chunk) else { continue };
        let Ok(decoded) = decode_copy(&ev, message) else { continue };
        let existed = state.existed() || state.live;
        let may_create = decoded.copy.may_create;
        match replica.incoming(&mut state, &mut ranks, &decoded.copy, now) {
            IncomingStep::Apply(plan) => {
                for (name, _) in &plan.fields {
                    assert!(message.get_field_by_name(name).is_some(), "unknown field applied");
                }
                if plan.local_id.is_none() && plan.op == concord_policy::replica::ApplyOp::Upsert {
                    assert!(may_create || existed, "a record created by a copy that may not create");
                }
                replica.applied(&mut state, &plan, "l-1", None, now);
            }
            IncomingStep::Stale | IncomingStep::Recorded => {}
        }
        assert!(replica.hlc().last() <= limit, "adopted a clock beyond the skew");
    }
});
