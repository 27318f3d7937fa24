//! Compiles the envelope (`proto/concord/v1/envelope.proto`) with protox (pure Rust, no
//! `protoc`) and prost-build. Entities are not compiled in: they are run-time configuration.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("concord/v1/envelope.proto"),
        root.join("concord/v1/control.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("concord_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    prost_build::Config::new()
        // Ordered maps: encoding the same event twice gives the same bytes.
        .btree_map(["."])
        .compile_fds(fds)?;
    Ok(())
}
