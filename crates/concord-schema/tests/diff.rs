//! Schema diffs: what breaks a running deployment and what does not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use concord_policy::Policy;
use concord_schema::diff::{self, ChangeKind};
use concord_schema::{Schema, SchemaDiff};

const SEED: &str = concord_seed_model::CUSTOMER_PROTO;

fn schema(text: &str) -> Schema {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customer.proto");
    std::fs::write(&path, text).unwrap();
    Schema::compile(&[&path], &[dir.path()]).unwrap()
}

fn changed(from: &str, to: &str) -> Schema {
    assert!(SEED.contains(from), "{from}");
    schema(&SEED.replace(from, to))
}

fn seed_policy(text: &str, old: &Schema) -> Policy {
    Policy::from_toml(text, "policy.toml", old.pool()).unwrap()
}

/// The policy-restricted diff from the seed schema to `new`, as lines.
fn policy_diff(new: &Schema) -> SchemaDiff {
    let old = schema(SEED);
    diff::for_policy(&seed_policy(concord_seed_model::POLICY, &old), new.pool())
}

fn lines(changes: &[concord_schema::Change]) -> Vec<String> {
    changes.iter().map(ToString::to_string).collect()
}

#[test]
fn the_same_schema_has_no_change() {
    let d = policy_diff(&schema(SEED));
    assert_eq!(d, SchemaDiff::default());
    assert!(!d.is_breaking());
    assert_eq!(
        diff::schemas(schema(SEED).pool(), schema(SEED).pool()),
        SchemaDiff::default()
    );
}

#[test]
fn adding_a_field_or_a_message_is_not_breaking() {
    let new = changed(
        "  optional string language = 12;\n}",
        "  optional string language = 12;\n  // Loyalty programme id.\n  optional string loyalty_id = 13;\n}\n\nmessage Note {\n  optional string text = 1;\n}",
    );
    let d = policy_diff(&new);
    assert!(!d.is_breaking(), "{:?}", lines(&d.breaking));
    assert_eq!(
        lines(&d.additions),
        [
            "entity `customer`: field `seed.v1.Customer.loyalty_id` (customer.proto:39) was added (number 13)",
            "message `seed.v1.Note` (customer.proto:42) was added",
        ]
    );
    let all = diff::schemas(schema(SEED).pool(), new.pool());
    assert!(!all.is_breaking());
    assert_eq!(all.additions.len(), 2);
}

#[test]
fn renumbering_retyping_renaming_or_removing_a_used_field_is_breaking() {
    let cases = [
        (
            (
                "optional string warehouse = 7;",
                "optional string warehouse = 17;",
            ),
            ChangeKind::FieldRenumbered { from: 7, to: 17 },
            "entity `customer`: field `seed.v1.Customer.warehouse` (customer.proto:27) was renumbered from 7 to 17",
        ),
        (
            (
                "optional int64 amount_paid = 8;",
                "optional string amount_paid = 8;",
            ),
            ChangeKind::TypeChanged {
                from: "int64".into(),
                to: "string".into(),
            },
            "entity `customer`: field `seed.v1.Customer.amount_paid` (customer.proto:29) changed type from int64 to string",
        ),
        (
            (
                "optional string warehouse = 7;",
                "optional string depot = 7;",
            ),
            ChangeKind::FieldRenamed { to: "depot".into() },
            "entity `customer`: field `seed.v1.Customer.warehouse` (customer.proto:27) was renamed to `depot` (same number)",
        ),
        (
            ("optional string warehouse = 7;", ""),
            ChangeKind::FieldRemoved,
            "entity `customer`: field `seed.v1.Customer.warehouse` (customer.proto:27) was removed",
        ),
        (
            ("optional string tier = 5;", "repeated string tier = 5;"),
            ChangeKind::CardinalityChanged {
                from: "optional",
                to: "repeated",
            },
            "entity `customer`: field `seed.v1.Customer.tier` (customer.proto:23) changed cardinality from optional to repeated",
        ),
        (
            ("optional string city = 2;", "optional string city = 5;"),
            ChangeKind::FieldRenumbered { from: 2, to: 5 },
            "entity `customer`: field `seed.v1.Address.city` (customer.proto:12) was renumbered from 2 to 5",
        ),
    ];
    for ((from, to), kind, line) in cases {
        let d = policy_diff(&changed(from, to));
        assert!(d.is_breaking(), "{from} -> {to}");
        assert_eq!(
            d.breaking.len(),
            1,
            "{from} -> {to}: {:?}",
            lines(&d.breaking)
        );
        assert_eq!(d.breaking[0].kind, kind);
        assert_eq!(d.breaking[0].to_string(), line);
        // The schema-wide diff sees it too.
        let all = diff::schemas(schema(SEED).pool(), changed(from, to).pool());
        assert!(all.is_breaking(), "{from} -> {to}");
    }
}

#[test]
fn a_removed_entity_message_is_breaking() {
    let new = changed("message Customer {", "message Client {");
    let d = policy_diff(&new);
    assert_eq!(
        lines(&d.breaking),
        ["entity `customer`: message `seed.v1.Customer` (customer.proto:17) was removed"]
    );
    assert_eq!(
        lines(&d.additions),
        ["message `seed.v1.Client` (customer.proto:17) was added"]
    );
}

#[test]
fn fields_the_policy_does_not_use_may_change() {
    let old = schema(SEED);
    let without_warehouse =
        concord_seed_model::POLICY.replace("warehouse = { owner = \"delivery\" }\n", "");
    assert_ne!(without_warehouse, concord_seed_model::POLICY);
    let policy = seed_policy(&without_warehouse, &old);
    // Step two of removing a field: it left the policy first, now it leaves the schema.
    let new = changed("optional string warehouse = 7;", "");
    assert!(!diff::for_policy(&policy, new.pool()).is_breaking());
    // Against the whole schema it is still a removal.
    let all = diff::schemas(old.pool(), new.pool());
    assert_eq!(
        lines(&all.breaking),
        ["field `seed.v1.Customer.warehouse` (customer.proto:27) was removed"]
    );
}

#[test]
fn enums_and_maps_held_by_used_fields_are_compared() {
    let v1 = "syntax = \"proto3\";\npackage shop.v1;\nenum Status {\n  STATUS_UNSPECIFIED = 0;\n  OPEN = 1;\n  SHIPPED = 2;\n}\nmessage Order {\n  Status status = 1;\n  map<string, int64> lines = 2;\n  int32 spare = 3;\n}\n";
    let policy_text = "[systems.a]\n[entities.order]\nmessage = \"shop.v1.Order\"\n[entities.order.fields]\nstatus = { owner = \"a\" }\nlines = { owner = \"a\" }\n";
    let old = schema(v1);
    let policy = seed_policy(policy_text, &old);
    let d = diff::for_policy(
        &policy,
        schema(&v1.replace("SHIPPED = 2;", "SHIPPED = 3;")).pool(),
    );
    assert_eq!(
        lines(&d.breaking),
        [
            "entity `order`: field `shop.v1.Order.status` (customer.proto:9): enum `shop.v1.Status`: value `SHIPPED` was renumbered from 2 to 3"
        ]
    );
    let d = diff::for_policy(
        &policy,
        schema(&v1.replace("map<string, int64>", "map<string, int32>")).pool(),
    );
    assert_eq!(
        lines(&d.breaking),
        [
            "entity `order`: field `shop.v1.Order.lines` (customer.proto:10) changed type from map<string, int64> to map<string, int32>"
        ]
    );
    let d = diff::for_policy(
        &policy,
        schema(&v1.replace("int32 spare = 3;", "optional int32 spare = 3;")).pool(),
    );
    assert!(!d.is_breaking(), "{:?}", lines(&d.breaking));
    let d = diff::schemas(
        old.pool(),
        schema(&v1.replace("int32 spare = 3;", "optional int32 spare = 3;")).pool(),
    );
    assert_eq!(
        lines(&d.breaking),
        [
            "field `shop.v1.Order.spare` (customer.proto:11) changed cardinality from singular to optional"
        ]
    );
}
