//! `concord explain` and `concord check`: dry runs over a policy file and the schema it names
//! (no broker).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};
use concord_policy::{MergeRule, Op, Policy, message_location};
use concord_schema::Deployment;
use serde::{Deserialize, Serialize};

/// One change event as JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvent {
    source: String,
    entity: String,
    #[serde(default)]
    key: String,
    #[serde(default = "upsert")]
    op: String,
    #[serde(default)]
    fields: serde_json::Map<String, serde_json::Value>,
}

fn upsert() -> String {
    "upsert".into()
}

#[derive(Debug, Serialize)]
struct Explanation {
    source: String,
    entity: String,
    key: String,
    op: &'static str,
    accepted: Vec<String>,
    rejected: Vec<RejectedField>,
    deliveries: Vec<SystemFields>,
    /// Per other system, accepted fields it does not receive because it may not see them.
    hidden: Vec<SystemFields>,
}

#[derive(Debug, Serialize)]
struct RejectedField {
    field: String,
    reason: &'static str,
}

#[derive(Debug, Serialize)]
struct SystemFields {
    system: String,
    fields: Vec<String>,
}

/// Loads the policy and the schema its `[schema]` table names.
pub(crate) fn load_deployment(path: &Path) -> anyhow::Result<Deployment> {
    Ok(Deployment::load(path)?)
}

pub(crate) fn explain(policy_path: &Path, event_path: &Path) -> anyhow::Result<String> {
    let policy = load_deployment(policy_path)?.policy;
    let text = std::fs::read_to_string(event_path)
        .with_context(|| format!("cannot read event {}", event_path.display()))?;
    let ev: JsonEvent = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a change event", event_path.display()))?;
    let at = event_path.display();
    let Some(source) = policy.system_id(&ev.source) else {
        bail!(
            "{at}: source `{}` is not a system of the policy (systems: {})",
            ev.source,
            policy.systems().join(", ")
        );
    };
    let Some(entity) = policy.entity(&ev.entity) else {
        bail!("{at}: entity `{}` is not in the policy", ev.entity);
    };
    let Some(op) = Op::parse(&ev.op) else {
        bail!(
            "{at}: op `{}` is not one of upsert, create, delete, snapshot",
            ev.op
        );
    };
    // Values of known fields must have the field's type: decode them through the descriptor.
    let mut known = serde_json::Map::new();
    for (name, value) in &ev.fields {
        if entity.message.get_field_by_name(name).is_some() && !value.is_null() {
            known.insert(name.clone(), value.clone());
        }
    }
    prost_reflect::DynamicMessage::deserialize(
        entity.message.clone(),
        serde_json::Value::Object(known),
    )
    .with_context(|| {
        format!(
            "{at}: field values do not fit {}",
            entity.message.full_name()
        )
    })?;

    let (verdict, rejections) =
        policy.decide_names(entity, source, op, ev.fields.keys().map(String::as_str));
    let mut accepted: Vec<String> = entity.names(verdict.accepted).map(str::to_owned).collect();
    accepted.sort();
    let mut deliveries = Vec::new();
    let mut delivered_to = BTreeMap::new();
    for (system, fields) in verdict.deliveries(entity) {
        let mut names: Vec<String> = entity.names(fields).map(str::to_owned).collect();
        names.sort();
        delivered_to.insert(policy.system_name(system).to_owned(), names.clone());
        deliveries.push(SystemFields {
            system: policy.system_name(system).to_owned(),
            fields: names,
        });
    }
    deliveries.sort_by(|a, b| a.system.cmp(&b.system));
    let mut hidden = Vec::new();
    for system in policy.system_ids().filter(|s| *s != source) {
        let name = policy.system_name(system);
        let got = delivered_to.get(name);
        let missing: Vec<String> = accepted
            .iter()
            .filter(|f| !got.is_some_and(|g| g.contains(f)))
            .cloned()
            .collect();
        if !missing.is_empty() {
            hidden.push(SystemFields {
                system: name.to_owned(),
                fields: missing,
            });
        }
    }
    hidden.sort_by(|a, b| a.system.cmp(&b.system));
    let out = Explanation {
        source: ev.source.clone(),
        entity: ev.entity.clone(),
        key: ev.key.clone(),
        op: op.as_str(),
        accepted,
        rejected: rejections
            .into_iter()
            .map(|r| RejectedField {
                field: r.field,
                reason: r.reason.as_str(),
            })
            .collect(),
        deliveries,
        hidden,
    };
    Ok(serde_json::to_string(&out)?)
}

/// What `concord check` prints, and whether it found no breaking change.
#[derive(Debug)]
pub(crate) struct CheckReport {
    pub(crate) out: String,
    pub(crate) compatible: bool,
}

/// Validates a policy with its schema and prints its matrix; with `against` (the policy in
/// force), also the schema changes that break what that policy uses, as the router's reload
/// would refuse them.
pub(crate) fn check(policy_path: &Path, against: Option<&Path>) -> anyhow::Result<CheckReport> {
    let deployment = load_deployment(policy_path)?;
    let mut out = matrix(policy_path, &deployment.policy)?;
    let mut compatible = true;
    if let Some(old_path) = against {
        let old = load_deployment(old_path)
            .with_context(|| format!("loading the policy in force {}", old_path.display()))?;
        let diff = concord_schema::diff::for_policy(&old.policy, deployment.schema.pool());
        writeln!(out)?;
        writeln!(out)?;
        compatible = !diff.is_breaking();
        reload_verdict(&mut out, old_path, &diff)?;
    }
    Ok(CheckReport {
        out: out.trim_end().to_owned(),
        compatible,
    })
}

/// Whether the router accepts a reload from the policy at `old_path` given the schema changes
/// in what that policy uses (`concord_schema::diff::for_policy`): the breaking changes it
/// refuses, then the additions. Shared by `check --against` and `policy diff`.
pub(crate) fn reload_verdict(
    out: &mut String,
    old_path: &Path,
    diff: &concord_schema::SchemaDiff,
) -> std::fmt::Result {
    if diff.is_breaking() {
        writeln!(
            out,
            "against {}: {} breaking schema change(s); the router refuses this reload:",
            old_path.display(),
            diff.breaking.len()
        )?;
        for c in &diff.breaking {
            writeln!(out, "  breaking: {c}")?;
        }
        writeln!(
            out,
            "  (to remove a field: drop it from the policy first, reload, then from the schema)"
        )?;
    } else {
        writeln!(
            out,
            "against {}: no breaking schema change; the router accepts this reload",
            old_path.display()
        )?;
    }
    for c in &diff.additions {
        writeln!(out, "  added: {c}")?;
    }
    Ok(())
}

/// The ownership/visibility matrix of a valid policy.
fn matrix(policy_path: &Path, policy: &Policy) -> anyhow::Result<String> {
    let mut out = String::new();
    let systems = policy.systems();
    let width = systems.iter().map(String::len).max().unwrap_or(0).max(8);
    writeln!(
        out,
        "policy {} is valid: {} systems, {} entities",
        policy_path.display(),
        systems.len(),
        policy.entities().len()
    )?;
    writeln!(
        out,
        "legend: O = owner, O1/O2.. = owner by priority (1 wins), O* = owner (last writer wins), r = reads, . = never sees"
    )?;
    for entity in policy.entities() {
        writeln!(out)?;
        writeln!(
            out,
            "entity {} ({}, {})",
            entity.name,
            entity.message.full_name(),
            message_location(&entity.message)
        )?;
        let names = |set: concord_policy::SystemSet| {
            set.iter()
                .map(|s| policy.system_name(s).to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(out, "  create: {}", or_none(names(entity.create)))?;
        writeln!(out, "  delete: {}", or_none(names(entity.delete)))?;
        let fw = entity
            .fields
            .iter()
            .map(|f| f.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        write!(out, "  {:fw$}", "field")?;
        for s in systems {
            write!(out, " {s:>width$}")?;
        }
        writeln!(out)?;
        for rule in &entity.fields {
            write!(out, "  {:fw$}", rule.name)?;
            for id in policy.system_ids() {
                let cell = match rule.owners.iter().position(|o| *o == id) {
                    Some(_) if rule.owners.len() == 1 => "O".to_owned(),
                    Some(p) if rule.merge == MergeRule::Priority => format!("O{}", p + 1),
                    Some(_) => "O*".to_owned(),
                    None if rule.visible.contains(id) => "r".to_owned(),
                    None => ".".to_owned(),
                };
                write!(out, " {cell:>width$}")?;
            }
            writeln!(out)?;
        }
        let unlisted: Vec<String> = entity
            .message
            .fields()
            .filter(|f| entity.field_index(f.name()).is_none())
            .map(|f| f.name().to_owned())
            .collect();
        if !unlisted.is_empty() {
            writeln!(
                out,
                "  not in the policy (unowned, invisible): {}",
                unlisted.join(", ")
            )?;
        }
    }
    Ok(out.trim_end().to_owned())
}

fn or_none(s: String) -> String {
    if s.is_empty() { "(nobody)".into() } else { s }
}
