//! Typed access to the seed scenario's schema (`examples/seed/customer.proto`, package
//! `seed.v1`): the generated `Customer` and `Address`, the schema's encoded descriptor set and
//! the texts of the seed policy and schema, for tests, benches, fuzz targets and demos.
//!
//! Concord's libraries never depend on this crate: to them the Customer is configuration,
//! loaded at run time from the `.proto` files a policy names. This crate exists only because
//! Rust code that wants to build a Customer with types needs generated code.

/// Generated types of package `seed.v1`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod seed {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/seed.v1.rs"));
    }
}

include!(concat!(env!("OUT_DIR"), "/customer_fields.rs"));

/// The encoded `google.protobuf.FileDescriptorSet` of `customer.proto`, with source info (so
/// messages and fields can be located by file and line).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/seed_descriptor.bin"));

/// Full name of the Customer message.
pub const CUSTOMER: &str = "seed.v1.Customer";

/// The text of `examples/seed/customer.proto`: write it next to a copy of [`POLICY`].
pub const CUSTOMER_PROTO: &str = include_str!("../../customer.proto");

/// The text of `examples/seed/policy.toml` (its `[schema]` names `customer.proto`).
pub const POLICY: &str = include_str!("../../policy.toml");

/// Writes the seed policy (as `policy.toml`) and its schema (`customer.proto`) into `dir` and
/// returns the policy's path.
pub fn write_seed(dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    write_deployment(dir, POLICY)
}

/// Writes `policy` (as `policy.toml`) and the seed schema (`customer.proto`) into `dir` and
/// returns the policy's path.
pub fn write_deployment(
    dir: &std::path::Path,
    policy: &str,
) -> std::io::Result<std::path::PathBuf> {
    std::fs::write(dir.join("customer.proto"), CUSTOMER_PROTO)?;
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_fields_start_with_the_name_and_count_twelve() {
        assert_eq!(CUSTOMER_FIELDS.len(), 12);
        assert_eq!(CUSTOMER_FIELDS[0], "name");
        assert!(CUSTOMER_FIELDS.contains(&"warehouse"));
        let c = seed::v1::Customer {
            name: Some("Ada".into()),
            ..Default::default()
        };
        assert!(!prost::Message::encode_to_vec(&c).is_empty());
        assert!(!FILE_DESCRIPTOR_SET.is_empty());
        assert!(POLICY.contains("[schema]"));
    }
}
