//! Shared helpers of the integration tests: the seed policy, random policies rendered as TOML,
//! a tiny deterministic RNG and builders for change events and Customer records.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;

use concord_policy::Policy;
use concord_proto::v1::{ChangeEvent, FieldClock};
use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, MessageDescriptor, Value};

pub use concord_seed_model::CUSTOMER_FIELDS;

/// A fixed "router now" used by tests that do not care about time: 2023-11-14.
pub const NOW_MS: u64 = 1_700_000_000_000;

pub const SEED_POLICY: &str = include_str!("../../../../examples/seed/policy.toml");

/// The seed scenario's schema (`examples/seed/customer.proto`).
/// (Decoded once: descriptors of different pools never compare equal.)
pub fn seed_pool() -> DescriptorPool {
    static POOL: std::sync::OnceLock<DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(concord_seed_model::FILE_DESCRIPTOR_SET).unwrap())
        .clone()
}

pub fn seed_policy() -> Policy {
    Policy::from_toml(SEED_POLICY, "policy.toml", &seed_pool()).unwrap()
}

pub fn customer() -> MessageDescriptor {
    seed_pool()
        .get_message_by_name(concord_seed_model::CUSTOMER)
        .unwrap()
}

pub fn field(name: &str) -> FieldDescriptor {
    customer().get_field_by_name(name).unwrap()
}

/// A tiny deterministic PRNG (xorshift64*, seeded through splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 11) % n as u64) as usize
    }
    /// Uniform in `lo..=hi`.
    pub fn range_i64(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i64
    }
    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den < num
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Who sees a field besides its owners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visible {
    /// `visible = ["*"]`.
    All,
    /// Indices of non-owner systems.
    Some(Vec<usize>),
}

/// One field of a generated policy.
#[derive(Debug, Clone)]
pub struct FieldSpec {
    pub field: &'static str,
    /// Owner indices, highest priority first.
    pub owners: Vec<usize>,
    /// `Some("lww" | "priority")`; required when there are several owners.
    pub merge: Option<&'static str>,
    pub visible: Visible,
}

/// A generated policy over the Customer entity with systems `sys0..sysN`.
#[derive(Debug, Clone)]
pub struct PolicySpec {
    pub systems: usize,
    pub fields: Vec<FieldSpec>,
    pub create: Vec<usize>,
    pub delete: Vec<usize>,
}

pub fn sys(i: usize) -> String {
    format!("sys{i}")
}

fn list(ids: &[usize]) -> String {
    let names: Vec<String> = ids.iter().map(|i| format!("\"{}\"", sys(*i))).collect();
    format!("[{}]", names.join(", "))
}

impl PolicySpec {
    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        for i in 0..self.systems {
            writeln!(t, "[systems.{}]", sys(i)).unwrap();
        }
        writeln!(t, "[entities.customer]").unwrap();
        writeln!(t, "message = \"seed.v1.Customer\"").unwrap();
        writeln!(t, "create = {}", list(&self.create)).unwrap();
        writeln!(t, "delete = {}", list(&self.delete)).unwrap();
        writeln!(t, "[entities.customer.fields]").unwrap();
        for f in &self.fields {
            let owners = if f.owners.len() == 1 {
                format!("owner = \"{}\"", sys(f.owners[0]))
            } else {
                format!("owners = {}", list(&f.owners))
            };
            let merge = f
                .merge
                .map(|m| format!(", merge = \"{m}\""))
                .unwrap_or_default();
            let visible = match &f.visible {
                Visible::All => "[\"*\"]".to_owned(),
                Visible::Some(v) => list(v),
            };
            writeln!(
                t,
                "{} = {{ {owners}{merge}, visible = {visible} }}",
                f.field
            )
            .unwrap();
        }
        t
    }

    pub fn load(&self) -> Policy {
        let text = self.to_toml();
        Policy::from_toml(&text, "random.toml", &seed_pool())
            .unwrap_or_else(|e| panic!("generated policy does not load: {e}\n{text}"))
    }

    /// A random policy: 1..=`max_systems` systems, each Customer field declared with probability
    /// 5/6, with 1..=3 owners in random priority order, a random merge rule and random readers.
    pub fn random(rng: &mut Rng, max_systems: usize) -> PolicySpec {
        let systems = 1 + rng.below(max_systems);
        let mut fields = Vec::new();
        for f in CUSTOMER_FIELDS {
            if rng.chance(1, 6) {
                continue;
            }
            let mut all: Vec<usize> = (0..systems).collect();
            rng.shuffle(&mut all);
            let n_owners = 1 + rng.below(systems.min(3));
            let owners: Vec<usize> = all[..n_owners].to_vec();
            let merge = match (n_owners, rng.below(3)) {
                (1, 0) => None,
                (_, 1) => Some("lww"),
                _ => Some("priority"),
            };
            let visible = if rng.chance(1, 8) {
                Visible::All
            } else {
                Visible::Some(
                    all[n_owners..]
                        .iter()
                        .copied()
                        .filter(|_| rng.chance(1, 2))
                        .collect(),
                )
            };
            fields.push(FieldSpec {
                field: f,
                owners,
                merge,
                visible,
            });
        }
        let create = (0..systems).filter(|_| rng.chance(1, 2)).collect();
        let delete = (0..systems).filter(|_| rng.chance(1, 2)).collect();
        PolicySpec {
            systems,
            fields,
            create,
            delete,
        }
    }
}

/// A marker embedded in every generated string value of `field`, so raw bytes can be searched.
pub fn marker(field: &str) -> String {
    format!("~v~{field}~")
}

/// A value for `field` of the Customer whose text (if any) starts with [`marker`].
pub fn value_for(field: &FieldDescriptor, tag: u64) -> Value {
    let name = field.name();
    match name {
        "address" => {
            let addr = customer()
                .get_field_by_name("address")
                .and_then(|f| f.kind().as_message().cloned())
                .unwrap();
            let mut m = DynamicMessage::new(addr.clone());
            for sub in ["street", "city", "postal_code", "country"] {
                let f = addr.get_field_by_name(sub).unwrap();
                m.set_field(&f, Value::String(format!("{}{sub}-{tag}", marker(name))));
            }
            Value::Message(m)
        }
        "amount_paid" => Value::I64(tag as i64),
        "open_tickets" => Value::U32(tag as u32),
        _ => Value::String(format!("{}{tag}", marker(name))),
    }
}

/// A Customer record with `fields` set to [`value_for`] values.
pub fn record_with(fields: &[&str], tag: u64) -> DynamicMessage {
    let mut m = DynamicMessage::new(customer());
    for f in fields {
        let fd = field(f);
        m.set_field(&fd, value_for(&fd, tag));
    }
    m
}

/// Appends an unknown length-delimited field `number` holding `text` to encoded message bytes.
pub fn append_unknown(bytes: &mut Vec<u8>, number: u32, text: &str) {
    push_varint(bytes, u64::from(number) << 3 | 2);
    push_varint(bytes, text.len() as u64);
    bytes.extend_from_slice(text.as_bytes());
}

pub fn push_varint(bytes: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        bytes.push((v as u8) | 0x80);
        v >>= 7;
    }
    bytes.push(v as u8);
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub fn clock(hlc: u64, system: &str) -> FieldClock {
    FieldClock {
        hlc,
        system: system.to_owned(),
        rank: 0,
    }
}

/// A valid envelope (upsert unless changed) with one clock per mask field at `hlc`.
pub fn event(source: &str, mask: &[&str], record: Vec<u8>, hlc: u64) -> ChangeEvent {
    ChangeEvent {
        event_id: "0190b9a4-6a3e-7cc1-9a6e-1d2f3a4b5c6d".to_owned(),
        source: source.to_owned(),
        entity: "customer".to_owned(),
        key: "c-1".to_owned(),
        op: concord_proto::v1::Op::Upsert as i32,
        record,
        field_mask: mask.iter().map(|s| (*s).to_owned()).collect(),
        clocks: mask
            .iter()
            .map(|f| ((*f).to_owned(), clock(hlc, source)))
            .collect::<BTreeMap<_, _>>(),
        schema_version: concord_proto::SCHEMA_VERSION,
        observed_at_ms: NOW_MS,
        ..Default::default()
    }
}
