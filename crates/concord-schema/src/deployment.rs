//! A deployment: a policy file and the schema its `[schema]` table names, loaded together.

use std::path::{Path, PathBuf};

use concord_policy::{Policy, PolicyError, SchemaSource, parse_schema_section};

use crate::schema::{Schema, SchemaError};

/// Why a deployment could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The policy file could not be read.
    #[error("cannot read policy file {}: {cause}", path.display())]
    ReadPolicy {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The policy names no schema.
    #[error(
        "{file}: no [schema] table: name the .proto files of the entities, e.g. `[schema] files = [\"model.proto\"]` (relative to the policy), or `descriptor_set = \"model.binpb\"`"
    )]
    NoSchema { file: String },
    /// The schema the policy names could not be loaded.
    #[error("{file}: [schema]: {error}")]
    Schema { file: String, error: SchemaError },
    /// The policy is invalid (against its schema); one line per problem.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

impl LoadError {
    /// Whether the policy file itself could not be read (as opposed to holding an invalid
    /// policy or naming an unusable schema).
    pub fn is_unreadable_policy(&self) -> bool {
        matches!(self, LoadError::ReadPolicy { .. })
    }
}

/// A policy and its schema, validated together.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// The validated policy; its entities' descriptors come from [`Deployment::schema`].
    pub policy: Policy,
    /// The schema the policy names.
    pub schema: Schema,
    path: PathBuf,
    text: String,
    watched: Vec<PathBuf>,
}

impl Deployment {
    /// Reads the policy file, loads the schema its `[schema]` table names (paths relative to
    /// the policy's directory) and validates the policy against it. A policy without
    /// `[schema]` is refused.
    pub fn load(policy_path: &Path) -> Result<Deployment, LoadError> {
        let text = std::fs::read_to_string(policy_path).map_err(|cause| LoadError::ReadPolicy {
            path: policy_path.to_owned(),
            cause,
        })?;
        let file = policy_path.display().to_string();
        let Some(source) = parse_schema_section(&text, &file)? else {
            return Err(LoadError::NoSchema { file });
        };
        let base = match policy_path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let schema = Schema::load(&source, &base).map_err(|error| LoadError::Schema {
            file: file.clone(),
            error,
        })?;
        let policy = Policy::from_toml(&text, &file, schema.pool())?;
        let mut watched = vec![policy_path.to_owned()];
        watched.extend(schema.sources().iter().cloned());
        if let SchemaSource::Files { files, .. } = &source {
            watched.extend(files.iter().map(|f| base.join(f)).filter(|p| p.is_dir()));
        }
        Ok(Deployment {
            policy,
            schema,
            path: policy_path.to_owned(),
            text,
            watched,
        })
    }

    /// The policy file.
    pub fn policy_path(&self) -> &Path {
        &self.path
    }

    /// The text of the policy file, as loaded.
    pub fn policy_text(&self) -> &str {
        &self.text
    }

    /// Whether `other` is the same deployment: the same policy text and the same schema
    /// contents. A reload that finds the same deployment changes nothing.
    pub fn same_as(&self, other: &Deployment) -> bool {
        self.text == other.text && self.schema.same_contents(&other.schema)
    }

    /// The files and directories the deployment was read from: the policy file, every schema
    /// file (imports included) and the directories `[schema] files` lists. A change to any of
    /// them may change the deployment.
    pub fn watched_paths(&self) -> &[PathBuf] {
        &self.watched
    }
}
