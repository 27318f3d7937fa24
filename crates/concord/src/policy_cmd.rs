//! `concord policy diff OLD NEW [--json]`: what loading NEW in place of OLD changes.
//!
//! Both policies are loaded with the schema each names, as `concord check` loads them; the
//! policy diff is `concord_policy::diff::diff`, the schema's breaking changes are
//! `concord_schema::diff::for_policy` (what the router's reload refuses), printed as
//! `concord check --against` prints them. This module only prints.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use concord_policy::diff::{AccessChange, Merge, PolicyDiff, Resync, diff as policy_diff};
use concord_schema::SchemaDiff;
use serde::Serialize;

use crate::explain::{load_deployment, reload_verdict};

/// What `concord policy diff` prints, and whether it found no change.
#[derive(Debug)]
pub(crate) struct PolicyDiffReport {
    pub(crate) out: String,
    pub(crate) unchanged: bool,
}

/// Loads OLD and NEW (with their schemas) and reports the changes, as a table or as JSON.
pub(crate) fn diff(
    old_path: &Path,
    new_path: &Path,
    json: bool,
) -> anyhow::Result<PolicyDiffReport> {
    let old = load_deployment(old_path).with_context(|| format!("OLD {}", old_path.display()))?;
    let new = load_deployment(new_path).with_context(|| format!("NEW {}", new_path.display()))?;
    let policy = policy_diff(&old.policy, &new.policy);
    let schema = concord_schema::diff::for_policy(&old.policy, new.schema.pool());
    let unchanged = policy.is_empty() && !schema.is_breaking();
    let out = if json {
        serde_json::to_string(&JsonDiff::new(&policy, &schema, unchanged))?
    } else {
        table(old_path, &policy, &schema)?
    };
    Ok(PolicyDiffReport { out, unchanged })
}

/// The command an operator runs to resync one system's copies of one entity.
fn resync_command(r: &Resync) -> String {
    format!("concord resync --system {} --entity {}", r.system, r.entity)
}

fn merge_text(m: &Merge) -> String {
    match m {
        Merge::SingleOwner => "single owner".to_owned(),
        Merge::Lww => "lww".to_owned(),
        Merge::Priority(order) => format!("priority ({})", order.join(" > ")),
    }
}

fn table(old_path: &Path, d: &PolicyDiff, schema: &SchemaDiff) -> anyhow::Result<String> {
    let mut out = String::new();
    for (what, names) in [
        ("systems added", &d.systems_added),
        ("systems removed", &d.systems_removed),
        ("entities added", &d.entities_added),
        ("entities removed", &d.entities_removed),
    ] {
        if !names.is_empty() {
            writeln!(out, "{what}: {}", names.join(", "))?;
        }
    }
    for m in &d.messages {
        writeln!(
            out,
            "entity {}: message {} -> {} (its fields are other fields)",
            m.entity, m.old, m.new
        )?;
    }
    if !d.access.is_empty() {
        if !out.is_empty() {
            writeln!(out)?;
        }
        let rows: Vec<[&str; 5]> =
            std::iter::once(["entity", "system", "right", "change", "fields"])
                .chain(d.access.iter().map(|a| {
                    [
                        a.entity.as_str(),
                        a.system.as_str(),
                        a.right.as_str(),
                        a.change.as_str(),
                        "",
                    ]
                }))
                .collect();
        let width = |col: usize| rows.iter().map(|r| r[col].len()).max().unwrap_or(0);
        let widths = [width(0), width(1), width(2), width(3)];
        let fields = std::iter::once("fields".to_owned()).chain(d.access.iter().map(fields_cell));
        for (row, fields) in rows.iter().zip(fields) {
            for (cell, w) in row.iter().zip(widths) {
                write!(out, "{cell:w$}  ")?;
            }
            writeln!(out, "{fields}")?;
        }
    }
    if !d.merges.is_empty() {
        writeln!(out)?;
        writeln!(out, "merge rules changed:")?;
        for m in &d.merges {
            writeln!(
                out,
                "  {}.{}: {} -> {}",
                m.entity,
                m.field,
                merge_text(&m.old),
                merge_text(&m.new)
            )?;
        }
    }
    if !out.is_empty() {
        writeln!(out)?;
    }
    reload_verdict(&mut out, old_path, schema)?;
    let resyncs = d.resyncs();
    if !resyncs.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "resync after loading NEW (these systems now see fields they were never sent):"
        )?;
        let commands: Vec<String> = resyncs.iter().map(resync_command).collect();
        let w = commands.iter().map(String::len).max().unwrap_or(0);
        for (r, command) in resyncs.iter().zip(&commands) {
            writeln!(out, "  {command:w$}  # {}", r.fields.join(", "))?;
        }
    }
    let kept: Vec<&AccessChange> = d.kept().collect();
    if !kept.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "no longer sent (Concord erases nothing: these copies keep the values they hold):"
        )?;
        for a in kept {
            writeln!(
                out,
                "  {}, entity {}: {}",
                a.system,
                a.entity,
                a.fields.join(", ")
            )?;
        }
    }
    writeln!(out)?;
    write!(
        out,
        "{} policy change(s), {} breaking schema change(s)",
        d.len(),
        schema.breaking.len()
    )?;
    Ok(out)
}

fn fields_cell(a: &AccessChange) -> String {
    if a.right.is_per_field() {
        a.fields.join(", ")
    } else {
        "-".to_owned()
    }
}

/// The `--json` shape (documented on the command in `main.rs`).
#[derive(Debug, Serialize)]
struct JsonDiff<'a> {
    changed: bool,
    changes: usize,
    systems: AddedRemoved<'a>,
    entities: JsonEntities<'a>,
    access: Vec<JsonAccess<'a>>,
    merge: Vec<JsonMergeChange<'a>>,
    resync: Vec<JsonResync>,
    kept: Vec<JsonKept<'a>>,
    schema: JsonSchema,
}

#[derive(Debug, Serialize)]
struct AddedRemoved<'a> {
    added: &'a [String],
    removed: &'a [String],
}

#[derive(Debug, Serialize)]
struct JsonEntities<'a> {
    added: &'a [String],
    removed: &'a [String],
    message_changed: Vec<JsonMessageChange<'a>>,
}

#[derive(Debug, Serialize)]
struct JsonMessageChange<'a> {
    entity: &'a str,
    old: &'a str,
    new: &'a str,
}

#[derive(Debug, Serialize)]
struct JsonAccess<'a> {
    entity: &'a str,
    system: &'a str,
    right: &'static str,
    change: &'static str,
    fields: &'a [String],
}

#[derive(Debug, Serialize)]
struct JsonMergeChange<'a> {
    entity: &'a str,
    field: &'a str,
    old: JsonMerge<'a>,
    new: JsonMerge<'a>,
}

#[derive(Debug, Serialize)]
struct JsonMerge<'a> {
    rule: &'static str,
    order: &'a [String],
}

impl<'a> JsonMerge<'a> {
    fn new(m: &'a Merge) -> JsonMerge<'a> {
        match m {
            Merge::SingleOwner => JsonMerge {
                rule: "single_owner",
                order: &[],
            },
            Merge::Lww => JsonMerge {
                rule: "lww",
                order: &[],
            },
            Merge::Priority(order) => JsonMerge {
                rule: "priority",
                order,
            },
        }
    }
}

#[derive(Debug, Serialize)]
struct JsonResync {
    system: String,
    entity: String,
    fields: Vec<String>,
    command: String,
}

#[derive(Debug, Serialize)]
struct JsonKept<'a> {
    system: &'a str,
    entity: &'a str,
    fields: &'a [String],
}

#[derive(Debug, Serialize)]
struct JsonSchema {
    reload: &'static str,
    breaking: Vec<String>,
    additions: Vec<String>,
}

impl<'a> JsonDiff<'a> {
    fn new(d: &'a PolicyDiff, schema: &SchemaDiff, unchanged: bool) -> JsonDiff<'a> {
        JsonDiff {
            changed: !unchanged,
            changes: d.len(),
            systems: AddedRemoved {
                added: &d.systems_added,
                removed: &d.systems_removed,
            },
            entities: JsonEntities {
                added: &d.entities_added,
                removed: &d.entities_removed,
                message_changed: d
                    .messages
                    .iter()
                    .map(|m| JsonMessageChange {
                        entity: &m.entity,
                        old: &m.old,
                        new: &m.new,
                    })
                    .collect(),
            },
            access: d
                .access
                .iter()
                .map(|a| JsonAccess {
                    entity: &a.entity,
                    system: &a.system,
                    right: a.right.as_str(),
                    change: a.change.as_str(),
                    fields: &a.fields,
                })
                .collect(),
            merge: d
                .merges
                .iter()
                .map(|m| JsonMergeChange {
                    entity: &m.entity,
                    field: &m.field,
                    old: JsonMerge::new(&m.old),
                    new: JsonMerge::new(&m.new),
                })
                .collect(),
            resync: d
                .resyncs()
                .into_iter()
                .map(|r| JsonResync {
                    command: resync_command(&r),
                    system: r.system,
                    entity: r.entity,
                    fields: r.fields,
                })
                .collect(),
            kept: d
                .kept()
                .map(|a| JsonKept {
                    system: &a.system,
                    entity: &a.entity,
                    fields: &a.fields,
                })
                .collect(),
            schema: JsonSchema {
                reload: if schema.is_breaking() {
                    "refused"
                } else {
                    "accepted"
                },
                breaking: schema.breaking.iter().map(ToString::to_string).collect(),
                additions: schema.additions.iter().map(ToString::to_string).collect(),
            },
        }
    }
}
