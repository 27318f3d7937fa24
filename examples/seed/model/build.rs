//! Compiles `examples/seed/customer.proto` with protox (pure Rust, no `protoc`) and prost-build,
//! and writes the Customer's field names in field-number order.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let file = root.join("customer.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("seed_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    let customer = fds
        .file
        .iter()
        .filter(|f| f.package() == "seed.v1")
        .flat_map(|f| &f.message_type)
        .find(|m| m.name() == "Customer")
        .ok_or("customer.proto declares no seed.v1.Customer")?;
    let mut fields: Vec<_> = customer.field.iter().collect();
    fields.sort_by_key(|f| f.number());
    let mut names = String::new();
    for f in &fields {
        write!(names, "{:?}, ", f.name())?;
    }
    std::fs::write(
        out.join("customer_fields.rs"),
        format!(
            "/// The field names of `seed.v1.Customer`, in field-number order.\n\
             pub const CUSTOMER_FIELDS: [&str; {}] = [{names}];\n",
            fields.len()
        ),
    )?;
    prost_build::Config::new()
        // Ordered maps: encoding the same record twice gives the same bytes.
        .btree_map(["."])
        .compile_fds(fds)?;
    Ok(())
}
