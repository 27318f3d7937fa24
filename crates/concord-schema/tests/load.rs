//! Loading schemas and deployments from files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use concord_schema::{Deployment, LoadError, Schema, SchemaError};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn compiles_proto_files_and_locates_messages_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    let proto = write(
        dir.path(),
        "customer.proto",
        concord_seed_model::CUSTOMER_PROTO,
    );
    let schema = Schema::compile(&[&proto], &[dir.path()]).unwrap();
    assert!(
        schema
            .pool()
            .get_message_by_name("seed.v1.Customer")
            .is_some()
    );
    assert_eq!(
        schema
            .location("seed.v1.Customer", None)
            .unwrap()
            .to_string(),
        "customer.proto:17"
    );
    assert_eq!(
        schema
            .location("seed.v1.Customer", Some("warehouse"))
            .unwrap()
            .to_string(),
        "customer.proto:27"
    );
    assert_eq!(schema.location("seed.v1.Customer", Some("nope")), None);
    assert_eq!(schema.location("seed.v1.Nope", None), None);
    assert_eq!(schema.sources().len(), 1);
    assert!(schema.sources()[0].ends_with("customer.proto"));
}

#[test]
fn a_directory_stands_for_every_proto_file_under_it() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "model/common/money.proto",
        "syntax = \"proto3\";\npackage shop.v1;\nmessage Money { int64 cents = 1; string currency = 2; }\n",
    );
    write(
        dir.path(),
        "model/order.proto",
        "syntax = \"proto3\";\npackage shop.v1;\nimport \"common/money.proto\";\nmessage Order {\n  optional string status = 1;\n  Money total = 2;\n}\n",
    );
    write(dir.path(), "model/README.md", "not a schema");
    let model = dir.path().join("model");
    let schema = Schema::compile(&[&model], &[&model]).unwrap();
    assert!(schema.pool().get_message_by_name("shop.v1.Order").is_some());
    assert!(schema.pool().get_message_by_name("shop.v1.Money").is_some());
    assert_eq!(
        schema
            .location("shop.v1.Order", Some("total"))
            .unwrap()
            .to_string(),
        "order.proto:6"
    );
    assert_eq!(schema.sources().len(), 2);

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = Schema::compile(&[&empty], &[&empty]).unwrap_err();
    assert!(matches!(err, SchemaError::NoProtoFiles { .. }), "{err}");
}

#[test]
fn compile_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.proto",
        "syntax = \"proto3\";\npackage bad.v1;\nmessage Bad {\n  optional strin name = 1;\n}\n",
    );
    let err = Schema::compile(&[&bad], &[dir.path()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.proto:4:"), "{err}");

    let missing = dir.path().join("missing.proto");
    let err = Schema::compile(&[&missing], &[dir.path()]).unwrap_err();
    assert!(matches!(err, SchemaError::Read { .. }), "{err}");
    assert!(err.to_string().contains("missing.proto"), "{err}");

    let elsewhere = tempfile::tempdir().unwrap();
    let good = write(
        elsewhere.path(),
        "good.proto",
        "syntax = \"proto3\";\npackage good.v1;\nmessage Good {}\n",
    );
    let err = Schema::compile(&[&good], &[dir.path()]).unwrap_err();
    assert!(matches!(err, SchemaError::NotIncluded { .. }), "{err}");
}

#[test]
fn a_descriptor_set_is_a_schema_too() {
    let schema = Schema::from_descriptor_set(concord_seed_model::FILE_DESCRIPTOR_SET).unwrap();
    assert_eq!(
        schema
            .location("seed.v1.Customer", None)
            .unwrap()
            .to_string(),
        "customer.proto:17"
    );
    let err = Schema::from_descriptor_set(b"\xff\xff not a set").unwrap_err();
    assert!(matches!(err, SchemaError::DescriptorSet { .. }), "{err}");
}

#[test]
fn a_deployment_is_a_policy_and_the_schema_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let policy = concord_seed_model::write_seed(dir.path()).unwrap();
    let d = Deployment::load(&policy).unwrap();
    assert_eq!(d.policy.entities().len(), 1);
    assert_eq!(
        d.policy.entities()[0].message.full_name(),
        "seed.v1.Customer"
    );
    assert_eq!(d.policy_path(), policy);
    assert!(d.policy_text().contains("[schema]"));
    let watched = d.watched_paths();
    assert!(watched.iter().any(|p| p == &policy), "{watched:?}");
    assert!(
        watched.iter().any(|p| p.ends_with("customer.proto")),
        "{watched:?}"
    );

    // Loading again finds the same deployment; a change to either file does not.
    let again = Deployment::load(&policy).unwrap();
    assert!(d.same_as(&again));
    let proto = dir.path().join("customer.proto");
    let text = std::fs::read_to_string(&proto).unwrap();
    std::fs::write(
        &proto,
        text.replace(
            "message Customer {",
            "message Customer {\n  optional string vat = 13;",
        ),
    )
    .unwrap();
    let changed = Deployment::load(&policy).unwrap();
    assert!(!d.same_as(&changed));
    assert!(
        changed
            .schema
            .location("seed.v1.Customer", Some("vat"))
            .is_some()
    );
}

#[test]
fn the_same_deployment_from_a_descriptor_set() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model.binpb"),
        concord_seed_model::FILE_DESCRIPTOR_SET,
    )
    .unwrap();
    let text = concord_seed_model::POLICY.replace(
        "files = [\"customer.proto\"]",
        "descriptor_set = \"model.binpb\"",
    );
    assert_ne!(text, concord_seed_model::POLICY);
    let policy = write(dir.path(), "policy.toml", &text);
    let d = Deployment::load(&policy).unwrap();
    assert!(d.policy.entity("customer").is_some());
    assert!(d.watched_paths().iter().any(|p| p.ends_with("model.binpb")));
}

#[test]
fn load_errors_name_the_file_and_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let err = Deployment::load(&missing).unwrap_err();
    assert!(err.is_unreadable_policy());
    assert!(err.to_string().contains("nope.toml"), "{err}");

    // No [schema]: the pure API accepts it, a deployment does not.
    let no_schema =
        concord_seed_model::POLICY.replace("[schema]\nfiles = [\"customer.proto\"]\n", "");
    assert_ne!(no_schema, concord_seed_model::POLICY);
    let policy = concord_seed_model::write_deployment(dir.path(), &no_schema).unwrap();
    let err = Deployment::load(&policy).unwrap_err();
    assert!(matches!(err, LoadError::NoSchema { .. }), "{err}");
    assert!(!err.is_unreadable_policy());
    assert!(
        err.to_string().contains("policy.toml: no [schema] table"),
        "{err}"
    );

    // A schema file that is not there.
    let text = concord_seed_model::POLICY.replace("customer.proto", "custmer.proto");
    let policy = concord_seed_model::write_deployment(dir.path(), &text).unwrap();
    let err = Deployment::load(&policy).unwrap_err().to_string();
    assert!(
        err.contains("policy.toml: [schema]: cannot read") && err.contains("custmer.proto"),
        "{err}"
    );

    // A policy problem about a field names where the message is declared.
    let text = concord_seed_model::POLICY.replace("warehouse = { owner", "warehose = { owner");
    let policy = concord_seed_model::write_deployment(dir.path(), &text).unwrap();
    let err = Deployment::load(&policy).unwrap_err().to_string();
    assert!(
        err.contains(
            "policy.toml: entity `customer`, field `warehose`: message `seed.v1.Customer` (customer.proto:17) has no field `warehose`"
        ),
        "{err}"
    );

    // A .proto syntax error, with file and line.
    let policy = concord_seed_model::write_seed(dir.path()).unwrap();
    std::fs::write(
        dir.path().join("customer.proto"),
        concord_seed_model::CUSTOMER_PROTO.replace(
            "optional string warehouse = 7;",
            "optional string warehouse = ;",
        ),
    )
    .unwrap();
    let err = Deployment::load(&policy).unwrap_err().to_string();
    assert!(err.contains("[schema]: customer.proto:27:"), "{err}");
}
