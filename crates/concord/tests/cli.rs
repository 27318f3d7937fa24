//! The `concord explain`, `concord check`, `concord schema diff` and `concord policy diff`
//! commands, run as a user would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn seed_policy() -> PathBuf {
    root().join("examples/seed/policy.toml")
}

fn concord(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(args)
        .output()
        .expect("run concord")
}

fn explain_json(event: &str) -> (Output, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("event.json");
    std::fs::write(&path, event).unwrap();
    let out = concord(&[
        "explain",
        "--policy",
        seed_policy().to_str().unwrap(),
        "--event",
        path.to_str().unwrap(),
    ]);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, json)
}

#[test]
fn explain_prints_the_documented_shape() {
    let event = std::fs::read_to_string(
        root().join("examples/seed/events/orders-renames-and-moves-warehouse.json"),
    )
    .unwrap();
    let (out, json) = explain_json(&event);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json["accepted"], serde_json::json!(["name"]));
    assert_eq!(
        json["rejected"],
        serde_json::json!([{"field": "warehouse", "reason": "not_owner"}])
    );
    assert_eq!(
        json["deliveries"],
        serde_json::json!([
            {"system": "delivery", "fields": ["name"]},
            {"system": "support", "fields": ["name"]}
        ])
    );
    // stdout is exactly one JSON object on one line.
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim_end().lines().count(), 1);
}

#[test]
fn explain_tells_who_does_not_see_what() {
    let (out, json) = explain_json(
        r#"{"source":"orders","entity":"customer","key":"c-1","op":"upsert","fields":{"amount_paid":1250,"name":"Ada","colour":"red"}}"#,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json["accepted"], serde_json::json!(["amount_paid", "name"]));
    assert_eq!(
        json["rejected"],
        serde_json::json!([{"field": "colour", "reason": "unknown_field"}])
    );
    assert_eq!(
        json["deliveries"],
        serde_json::json!([
            {"system": "delivery", "fields": ["name"]},
            {"system": "support", "fields": ["amount_paid", "name"]}
        ])
    );
    assert_eq!(
        json["hidden"],
        serde_json::json!([{"system": "delivery", "fields": ["amount_paid"]}])
    );
}

#[test]
fn explain_warehouse_change_reaches_nobody_else() {
    let (out, json) = explain_json(
        r#"{"source":"delivery","entity":"customer","key":"c-1","op":"upsert","fields":{"warehouse":"W9","delivery_status":"packed"}}"#,
    );
    assert!(out.status.success());
    assert_eq!(
        json["deliveries"],
        serde_json::json!([
            {"system": "orders", "fields": ["delivery_status"]},
            {"system": "support", "fields": ["delivery_status"]}
        ])
    );
}

#[test]
fn malformed_events_exit_2_with_a_precise_message() {
    let cases = [
        ("{not json", "not a change event"),
        (
            r#"{"source":"orders","entity":"customer","fields":{},"extra":1}"#,
            "unknown field `extra`",
        ),
        (
            r#"{"source":"billing","entity":"customer","fields":{}}"#,
            "source `billing` is not a system",
        ),
        (
            r#"{"source":"orders","entity":"invoice","fields":{}}"#,
            "entity `invoice` is not in the policy",
        ),
        (
            r#"{"source":"orders","entity":"customer","op":"merge","fields":{}}"#,
            "op `merge`",
        ),
        (
            r#"{"source":"orders","entity":"customer","fields":{"amount_paid":"lots"}}"#,
            "do not fit seed.v1.Customer",
        ),
    ];
    for (event, expected) in cases {
        let (out, _) = explain_json(event);
        assert_eq!(out.status.code(), Some(2), "{event}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{event}: {err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn an_invalid_policy_exits_2_naming_file_entity_and_field() {
    let dir = tempfile::tempdir().unwrap();
    concord_seed_model::write_seed(dir.path()).unwrap();
    let policy = dir.path().join("bad.toml");
    std::fs::write(
        &policy,
        "[schema]\nfiles = [\"customer.proto\"]\n[systems.orders]\n[entities.customer]\nmessage = \"seed.v1.Customer\"\n[entities.customer.fields]\nname = { owner = \"sales\" }\nnmae = { owner = \"orders\" }\n",
    )
    .unwrap();
    let out = concord(&["check", "--policy", policy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "bad.toml: entity `customer`, field `name`: `owners` names unknown system `sales`"
        ),
        "{err}"
    );
    // A problem about a field names the .proto file and line of its message.
    assert!(
        err.contains(
            "bad.toml: entity `customer`, field `nmae`: message `seed.v1.Customer` (customer.proto:17) has no field `nmae`"
        ),
        "{err}"
    );
}

#[test]
fn a_policy_without_a_schema_or_with_a_broken_one_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let no_schema =
        concord_seed_model::POLICY.replace("[schema]\nfiles = [\"customer.proto\"]\n", "");
    let policy = concord_seed_model::write_deployment(dir.path(), &no_schema).unwrap();
    let out = concord(&["check", "--policy", policy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy.toml: no [schema] table"), "{err}");

    let policy = concord_seed_model::write_seed(dir.path()).unwrap();
    std::fs::write(
        dir.path().join("customer.proto"),
        concord_seed_model::CUSTOMER_PROTO.replace(
            "optional int64 amount_paid = 8;",
            "optional int65 amount_paid = 8;",
        ),
    )
    .unwrap();
    for args in [
        vec!["check", "--policy", policy.to_str().unwrap()],
        vec![
            "explain",
            "--policy",
            policy.to_str().unwrap(),
            "--event",
            "unused.json",
        ],
    ] {
        let out = concord(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("policy.toml: [schema]: "), "{err}");
        assert!(err.contains("customer.proto:29:"), "{err}");
    }
}

/// A copy of the seed deployment in a fresh directory, with `customer.proto` edited.
fn seed_with(dir: &Path, from: &str, to: &str) -> PathBuf {
    assert!(concord_seed_model::CUSTOMER_PROTO.contains(from), "{from}");
    let policy = concord_seed_model::write_seed(dir).unwrap();
    std::fs::write(
        dir.join("customer.proto"),
        concord_seed_model::CUSTOMER_PROTO.replace(from, to),
    )
    .unwrap();
    policy
}

#[test]
fn check_against_the_policy_in_force_lists_breaking_schema_changes() {
    let added = tempfile::tempdir().unwrap();
    let added = seed_with(
        added.path(),
        "  optional string language = 12;\n",
        "  optional string language = 12;\n  optional string loyalty_id = 13;\n",
    );
    let in_force = seed_policy();
    let out = concord(&[
        "check",
        "--policy",
        added.to_str().unwrap(),
        "--against",
        in_force.to_str().unwrap(),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("no breaking schema change"), "{text}");
    assert!(
        text.contains("added: entity `customer`: field `seed.v1.Customer.loyalty_id` (customer.proto:38) was added (number 13)"),
        "{text}"
    );

    let renumbered = tempfile::tempdir().unwrap();
    let renumbered = seed_with(renumbered.path(), "warehouse = 7;", "warehouse = 17;");
    let out = concord(&[
        "check",
        "--policy",
        renumbered.to_str().unwrap(),
        "--against",
        in_force.to_str().unwrap(),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    // The matrix is still printed, then the breaking changes.
    assert!(
        text.contains("entity customer (seed.v1.Customer, customer.proto:17)"),
        "{text}"
    );
    assert!(
        text.contains("breaking: entity `customer`: field `seed.v1.Customer.warehouse` (customer.proto:27) was renumbered from 7 to 17"),
        "{text}"
    );
}

#[test]
fn schema_diff_compares_policies_proto_files_directories_and_descriptor_sets() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old");
    let new = dir.path().join("new");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::create_dir_all(&new).unwrap();
    let old_policy = concord_seed_model::write_seed(&old).unwrap();
    let new_policy = seed_with(
        &new,
        "optional string tier = 5;",
        "repeated string tier = 5;",
    );
    let set = dir.path().join("old.binpb");
    std::fs::write(&set, concord_seed_model::FILE_DESCRIPTOR_SET).unwrap();
    let expected = "breaking: field `seed.v1.Customer.tier` (customer.proto:23) changed cardinality from optional to repeated";
    for (from, to) in [
        (old_policy.clone(), new_policy.clone()),
        (old.join("customer.proto"), new.join("customer.proto")),
        (set.clone(), new.clone()),
    ] {
        let out = concord(&[
            "schema",
            "diff",
            from.to_str().unwrap(),
            to.to_str().unwrap(),
        ]);
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(out.status.code(), Some(1), "{from:?} {to:?}: {text}");
        assert!(text.contains(expected), "{text}");
        assert!(
            text.ends_with("1 breaking change(s), 0 addition(s)\n"),
            "{text}"
        );
    }
    // Restricted to a policy that does not use `tier`, nothing breaks.
    let without_tier = old.join("no-tier.toml");
    std::fs::write(
        &without_tier,
        concord_seed_model::POLICY.replace(
            "tier = { owner = \"orders\", visible = [\"support\"] }\n",
            "",
        ),
    )
    .unwrap();
    let out = concord(&[
        "schema",
        "diff",
        old_policy.to_str().unwrap(),
        new_policy.to_str().unwrap(),
        "--policy",
        without_tier.to_str().unwrap(),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("0 breaking change(s) in what"), "{text}");
    // The same schema: no change at all.
    let out = concord(&[
        "schema",
        "diff",
        set.to_str().unwrap(),
        old_policy.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "0 breaking change(s), 0 addition(s)\n"
    );
    // Bad input exits 2.
    let out = concord(&[
        "schema",
        "diff",
        dir.path().join("nope.proto").to_str().unwrap(),
        set.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.proto"));
}

#[test]
fn check_prints_the_matrix() {
    let out = concord(&["check", "--policy", seed_policy().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let row = |field: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(field))
            .unwrap_or_else(|| panic!("no row {field} in\n{text}"))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
    };
    // Columns are systems in name order: delivery, orders, support.
    assert_eq!(row("warehouse"), ["O", ".", "."]);
    assert_eq!(row("amount_paid"), [".", "O", "r"]);
    assert_eq!(row("delivery_status"), ["O", "r", "r"]);
    assert_eq!(row("phone"), ["r", "O*", "O*"]);
    assert_eq!(row("delivery_notes"), ["O2", ".", "O1"]);
    assert!(text.contains("create: orders"));
}

/// The seed deployment in `dir` with each `(from, to)` of its policy replaced.
fn seed_policy_with(dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = concord_seed_model::POLICY.to_owned();
    for (from, to) in edits {
        assert!(text.contains(from), "{from}");
        text = text.replace(from, to);
    }
    concord_seed_model::write_deployment(dir, &text).unwrap()
}

/// Billing joins and sees what was paid, the driver stops seeing the address, the phone goes
/// to priority merging and sales may no longer delete customers.
fn edited_seed_policy(dir: &Path) -> PathBuf {
    seed_policy_with(
        dir,
        &[
            (
                "[systems.delivery]",
                "[systems.billing]\n[systems.delivery]",
            ),
            (
                "amount_paid = { owner = \"orders\", visible = [\"support\"] }",
                "amount_paid = { owner = \"orders\", visible = [\"support\", \"billing\"] }",
            ),
            (
                "address = { owner = \"orders\", visible = [\"support\", \"delivery\"] }",
                "address = { owner = \"orders\", visible = [\"support\"] }",
            ),
            (
                "phone = { owners = [\"orders\", \"support\"], merge = \"lww\"",
                "phone = { owners = [\"support\", \"orders\"], merge = \"priority\"",
            ),
            ("delete = [\"orders\"]", "delete = []"),
        ],
    )
}

#[test]
fn policy_diff_of_a_policy_with_itself_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let copy = concord_seed_model::write_seed(dir.path()).unwrap();
    let old = seed_policy();
    let out = concord(&[
        "policy",
        "diff",
        old.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!(
            "against {}: no breaking schema change; the router accepts this reload\n\n\
             0 policy change(s), 0 breaking schema change(s)\n",
            old.display()
        )
    );
}

#[test]
fn policy_diff_prints_rights_merges_resyncs_and_kept_copies() {
    let dir = tempfile::tempdir().unwrap();
    let new = edited_seed_policy(dir.path());
    let old = seed_policy();
    let out = concord(&[
        "policy",
        "diff",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    let expected = format!(
        "systems added: billing

entity    system    right   change  fields
customer  billing   read    gained  amount_paid
customer  delivery  read    lost    address
customer  orders    delete  lost    -

merge rules changed:
  customer.phone: lww -> priority (support > orders)

against {}: no breaking schema change; the router accepts this reload

resync after loading NEW (these systems now see fields they were never sent):
  concord resync --system billing --entity customer  # amount_paid

no longer sent (Concord erases nothing: these copies keep the values they hold):
  delivery, entity customer: address

5 policy change(s), 0 breaking schema change(s)
",
        old.display()
    );
    assert_eq!(text, expected);
    // Backwards, the same changes the other way round.
    let out = concord(&[
        "policy",
        "diff",
        new.to_str().unwrap(),
        old.to_str().unwrap(),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.starts_with("systems removed: billing\n"), "{text}");
    assert!(
        text.contains("\ncustomer  billing   read    lost    amount_paid\n"),
        "{text}"
    );
    assert!(
        text.contains("\n  concord resync --system delivery --entity customer  # address\n"),
        "{text}"
    );
    assert!(
        text.contains("\n  customer.phone: priority (support > orders) -> lww\n"),
        "{text}"
    );
}

#[test]
fn policy_diff_json_has_the_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let new = edited_seed_policy(dir.path());
    let out = concord(&[
        "policy",
        "diff",
        seed_policy().to_str().unwrap(),
        new.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim_end().lines().count(), 1, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "changed": true,
            "changes": 5,
            "systems": {"added": ["billing"], "removed": []},
            "entities": {"added": [], "removed": [], "message_changed": []},
            "access": [
                {"entity": "customer", "system": "billing", "right": "read", "change": "gained", "fields": ["amount_paid"]},
                {"entity": "customer", "system": "delivery", "right": "read", "change": "lost", "fields": ["address"]},
                {"entity": "customer", "system": "orders", "right": "delete", "change": "lost", "fields": []}
            ],
            "merge": [{
                "entity": "customer", "field": "phone",
                "old": {"rule": "lww", "order": []},
                "new": {"rule": "priority", "order": ["support", "orders"]}
            }],
            "resync": [{
                "system": "billing", "entity": "customer", "fields": ["amount_paid"],
                "command": "concord resync --system billing --entity customer"
            }],
            "kept": [{"system": "delivery", "entity": "customer", "fields": ["address"]}],
            "schema": {"reload": "accepted", "breaking": [], "additions": []}
        })
    );
    // No change: the same shape, empty.
    let out = concord(&[
        "policy",
        "diff",
        seed_policy().to_str().unwrap(),
        seed_policy().to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["changed"], false);
    assert_eq!(json["changes"], 0);
    assert_eq!(json["access"], serde_json::json!([]));
    assert_eq!(json["resync"], serde_json::json!([]));
}

#[test]
fn policy_diff_reports_the_schema_changes_the_reload_refuses() {
    // The same policy on a schema that renumbers a field it uses and adds one.
    let dir = tempfile::tempdir().unwrap();
    let new = seed_with(dir.path(), "warehouse = 7;", "warehouse = 17;");
    std::fs::write(
        dir.path().join("customer.proto"),
        std::fs::read_to_string(dir.path().join("customer.proto"))
            .unwrap()
            .replace(
                "  optional string language = 12;\n",
                "  optional string language = 12;\n  optional string loyalty_id = 13;\n",
            ),
    )
    .unwrap();
    let old = seed_policy();
    let out = concord(&[
        "policy",
        "diff",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(
        text,
        format!(
            "against {}: 1 breaking schema change(s); the router refuses this reload:
  breaking: entity `customer`: field `seed.v1.Customer.warehouse` (customer.proto:27) was renumbered from 7 to 17
  (to remove a field: drop it from the policy first, reload, then from the schema)
  added: entity `customer`: field `seed.v1.Customer.loyalty_id` (customer.proto:38) was added (number 13)

0 policy change(s), 1 breaking schema change(s)
",
            old.display()
        )
    );
    let out = concord(&[
        "policy",
        "diff",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["changed"], true);
    assert_eq!(json["changes"], 0);
    assert_eq!(json["schema"]["reload"], "refused");
    assert_eq!(
        json["schema"]["breaking"],
        serde_json::json!([
            "entity `customer`: field `seed.v1.Customer.warehouse` (customer.proto:27) was renumbered from 7 to 17"
        ])
    );

    // An addition alone changes nothing the router does: exit 0.
    let added = tempfile::tempdir().unwrap();
    let added = seed_with(
        added.path(),
        "  optional string language = 12;\n",
        "  optional string language = 12;\n  optional string loyalty_id = 13;\n",
    );
    let out = concord(&[
        "policy",
        "diff",
        old.to_str().unwrap(),
        added.to_str().unwrap(),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("\n  added: entity `customer`: field `seed.v1.Customer.loyalty_id`"),
        "{text}"
    );
}

#[test]
fn policy_diff_of_bad_input_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let invalid = seed_policy_with(
        dir.path(),
        &[(
            "warehouse = { owner = \"delivery\" }",
            "warehouse = { owner = \"depot\" }",
        )],
    );
    let missing = dir.path().join("nope.toml");
    let seed = seed_policy();
    for (old, new, expected) in [
        (&missing, &seed, "error: OLD "),
        (&seed, &missing, "cannot read policy file"),
        (
            &seed,
            &invalid,
            "policy.toml: entity `customer`, field `warehouse`: `owners` names unknown system `depot`",
        ),
    ] {
        let out = concord(&[
            "policy",
            "diff",
            old.to_str().unwrap(),
            new.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(2), "{old:?} {new:?}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{err}");
    }
}
