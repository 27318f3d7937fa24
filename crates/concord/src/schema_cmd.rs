//! `concord schema diff OLD NEW [--policy P]`: the changes between two schemas.
//!
//! OLD and NEW are each one of:
//! - a policy file (`*.toml`): the schema its `[schema]` table names;
//! - a `.proto` file (its directory is the include path, with `--include`);
//! - a directory: every `.proto` file under it (the directory is the include path);
//! - any other file: an encoded `google.protobuf.FileDescriptorSet`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use concord_policy::Policy;
use concord_schema::{Deployment, Schema};

/// Loads one side of a diff.
fn load(path: &Path, include: &[PathBuf]) -> anyhow::Result<Schema> {
    if path.extension().is_some_and(|e| e == "toml") {
        return Ok(Deployment::load(path)?.schema);
    }
    let mut includes = Vec::new();
    if path.is_dir() {
        includes.push(path.to_owned());
    } else if path.extension().is_some_and(|e| e == "proto") {
        includes.push(match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        });
    } else {
        return Ok(Schema::read_descriptor_set(path)?);
    }
    includes.extend(include.iter().cloned());
    Ok(Schema::compile(&[path], &includes)?)
}

/// What `concord schema diff` prints, and whether no change is breaking.
#[derive(Debug)]
pub(crate) struct DiffReport {
    pub(crate) out: String,
    pub(crate) compatible: bool,
}

pub(crate) fn diff(
    old: &Path,
    new: &Path,
    policy: Option<&Path>,
    include: &[PathBuf],
) -> anyhow::Result<DiffReport> {
    let old_schema = load(old, include).with_context(|| format!("OLD {}", old.display()))?;
    let new_schema = load(new, include).with_context(|| format!("NEW {}", new.display()))?;
    let diff = match policy {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read policy {}", p.display()))?;
            let policy = Policy::from_toml(&text, &p.display().to_string(), old_schema.pool())
                .with_context(|| {
                    format!("the policy does not fit the OLD schema {}", old.display())
                })?;
            concord_schema::diff::for_policy(&policy, new_schema.pool())
        }
        None => concord_schema::diff::schemas(old_schema.pool(), new_schema.pool()),
    };
    let mut out = String::new();
    for c in &diff.breaking {
        writeln!(out, "breaking: {c}")?;
    }
    for c in &diff.additions {
        writeln!(out, "added: {c}")?;
    }
    let scope = match policy {
        Some(p) => format!(" in what {} uses", p.display()),
        None => String::new(),
    };
    write!(
        out,
        "{} breaking change(s){scope}, {} addition(s)",
        diff.breaking.len(),
        diff.additions.len()
    )?;
    Ok(DiffReport {
        out,
        compatible: !diff.is_breaking(),
    })
}
