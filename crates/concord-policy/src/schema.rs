//! What a policy says about its schema (the `[schema]` table), and where the schema declares a
//! message or a field (file and line, from the descriptors' source info).
//!
//! Pure: this module names files but never reads them; `concord-schema` does.

use std::fmt;

use prost_reflect::{FieldDescriptor, MessageDescriptor};
use serde::Deserialize;

use crate::model::{PolicyError, Problem};

/// Where a policy's canonical model comes from, as its `[schema]` table says. Paths are as
/// written: relative paths are relative to the directory of the policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaSource {
    /// `.proto` files, compiled at load time. A directory stands for every `.proto` file under
    /// it.
    Files {
        /// Files or directories.
        files: Vec<String>,
        /// Import paths; empty means the policy's directory.
        include: Vec<String>,
    },
    /// An encoded `google.protobuf.FileDescriptorSet` (e.g. `protoc -o model.binpb
    /// --include_source_info ...`).
    DescriptorSet(String),
}

/// The `[schema]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSchema {
    files: Option<Vec<String>>,
    include: Option<Vec<String>>,
    descriptor_set: Option<String>,
}

impl RawSchema {
    /// Checks the table; `problem` receives each mistake.
    pub(crate) fn resolve(self, mut problem: impl FnMut(String)) -> Option<SchemaSource> {
        let empty = |v: &[String]| v.iter().any(|s| s.trim().is_empty());
        match (self.files, self.descriptor_set) {
            (Some(files), None) => {
                let include = self.include.unwrap_or_default();
                if files.is_empty() {
                    problem("[schema]: `files` lists no file or directory".into());
                    return None;
                }
                if empty(&files) || empty(&include) {
                    problem("[schema]: empty path in `files` or `include`".into());
                    return None;
                }
                Some(SchemaSource::Files { files, include })
            }
            (None, Some(set)) => {
                if self.include.is_some() {
                    problem(
                        "[schema]: `include` applies to `files` only, not to `descriptor_set`"
                            .into(),
                    );
                    return None;
                }
                if set.trim().is_empty() {
                    problem("[schema]: `descriptor_set` is empty".into());
                    return None;
                }
                Some(SchemaSource::DescriptorSet(set))
            }
            (Some(_), Some(_)) => {
                problem("[schema]: set either `files` or `descriptor_set`, not both".into());
                None
            }
            (None, None) => {
                problem(
                    "[schema]: name the schema with `files = [\"<file>.proto\", ...]` or `descriptor_set = \"<file>\"`"
                        .into(),
                );
                None
            }
        }
    }
}

/// Reads only the `[schema]` table of a policy (the rest is checked by
/// [`crate::Policy::from_toml`], once the schema is loaded). `Ok(None)` when the policy has no
/// `[schema]` table.
pub fn parse_schema_section(text: &str, file: &str) -> Result<Option<SchemaSource>, PolicyError> {
    #[derive(Deserialize)]
    struct OnlySchema {
        schema: Option<RawSchema>,
    }
    let error = |message: String| PolicyError {
        problems: vec![Problem {
            file: file.to_owned(),
            entity: None,
            field: None,
            message,
        }],
    };
    let raw: OnlySchema =
        toml::from_str(text).map_err(|e| error(e.to_string().trim_end().replace('\n', " ")))?;
    let Some(raw) = raw.schema else {
        return Ok(None);
    };
    let mut first = None;
    let source = raw.resolve(|m| {
        first.get_or_insert(m);
    });
    match (source, first) {
        (Some(s), None) => Ok(Some(s)),
        (_, Some(m)) => Err(error(m)),
        (None, None) => Err(error("[schema]: invalid".into())),
    }
}

/// Where something is declared in a schema: the `.proto` file (as named in the descriptor set,
/// relative to its include path) and, when the descriptors carry source info, the line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub file: String,
    /// 1-based.
    pub line: Option<u32>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.file),
            None => write!(f, "{}", self.file),
        }
    }
}

/// Where `message` is declared.
pub fn message_location(message: &MessageDescriptor) -> Location {
    let file = message.parent_file();
    locate(file.file_descriptor_proto(), message.path())
}

/// Where `field` is declared.
pub fn field_location(field: &FieldDescriptor) -> Location {
    let file = field.parent_file();
    locate(file.file_descriptor_proto(), field.path())
}

fn locate(file: &prost_reflect::prost_types::FileDescriptorProto, path: &[i32]) -> Location {
    let line = file.source_code_info.as_ref().and_then(|info| {
        info.location
            .iter()
            .find(|l| l.path == path)
            .and_then(|l| l.span.first())
            .and_then(|line| u32::try_from(*line).ok())
            .map(|line| line.saturating_add(1))
    });
    Location {
        file: file.name().to_owned(),
        line,
    }
}
