//! Loading a schema: `.proto` files compiled with protox, or an encoded descriptor set.

use std::path::{Path, PathBuf};

use concord_policy::{Location, SchemaSource, field_location, message_location};
use prost_reflect::DescriptorPool;

/// Why a schema could not be loaded. Messages name the file (and, for `.proto` syntax or
/// semantic errors, the line and column).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// A schema file or directory could not be read.
    #[error("cannot read {}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A directory holds no `.proto` file.
    #[error("{}: no .proto file in this directory", path.display())]
    NoProtoFiles { path: PathBuf },
    /// A `.proto` file is not under any include path.
    #[error("{} is not under any include path ({})", path.display(), includes)]
    NotIncluded { path: PathBuf, includes: String },
    /// protox refused the files: `file:line:column: problem`.
    #[error("{0}")]
    Compile(String),
    /// The descriptor set could not be decoded or is inconsistent.
    #[error("{}: not a valid FileDescriptorSet: {cause}", path.display())]
    DescriptorSet { path: PathBuf, cause: String },
}

/// A loaded schema: the descriptors of the canonical messages.
#[derive(Debug, Clone)]
pub struct Schema {
    pool: DescriptorPool,
    /// The encoded descriptor set: two schemas with equal encodings are the same schema.
    encoded: Vec<u8>,
    /// The files it was read from (every compiled `.proto`, imports included, or the descriptor
    /// set), for watching.
    sources: Vec<PathBuf>,
}

impl Schema {
    /// A schema from a descriptor pool already in memory.
    pub fn from_pool(pool: DescriptorPool) -> Schema {
        Schema {
            encoded: pool.encode_to_vec(),
            pool,
            sources: Vec::new(),
        }
    }

    /// Compiles `.proto` files with protox. A directory in `files` stands for every `.proto`
    /// file under it (recursively, in name order). Every file must lie under one of
    /// `includes`, against which imports are resolved; its name in the descriptors (and in
    /// locations) is its path relative to that include path.
    pub fn compile(
        files: &[impl AsRef<Path>],
        includes: &[impl AsRef<Path>],
    ) -> Result<Schema, SchemaError> {
        let includes: Vec<PathBuf> = includes
            .iter()
            .map(|i| canonical(i.as_ref()))
            .collect::<Result<_, _>>()?;
        let mut protos = Vec::new();
        for f in files {
            let path = canonical(f.as_ref())?;
            if path.is_dir() {
                let before = protos.len();
                proto_files(&path, &mut protos)?;
                if protos.len() == before {
                    return Err(SchemaError::NoProtoFiles { path });
                }
            } else {
                protos.push(path);
            }
        }
        for p in &protos {
            if !includes.iter().any(|i| p.starts_with(i)) {
                return Err(SchemaError::NotIncluded {
                    path: p.clone(),
                    includes: includes
                        .iter()
                        .map(|i| i.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        let mut compiler =
            protox::Compiler::new(&includes).map_err(|e| SchemaError::Compile(format!("{e:?}")))?;
        compiler.include_source_info(true).include_imports(true);
        compiler
            .open_files(&protos)
            .map_err(|e| SchemaError::Compile(format!("{e:?}")))?;
        let sources = compiler
            .files()
            .filter_map(|f| f.path().map(Path::to_path_buf))
            .collect();
        let pool = compiler.descriptor_pool();
        Ok(Schema {
            encoded: pool.encode_to_vec(),
            pool,
            sources,
        })
    }

    /// Decodes an encoded `google.protobuf.FileDescriptorSet` (it must hold every file its
    /// files import). Locations have lines only if it was produced with source info.
    pub fn from_descriptor_set(bytes: &[u8]) -> Result<Schema, SchemaError> {
        let pool = DescriptorPool::decode(bytes).map_err(|e| SchemaError::DescriptorSet {
            path: PathBuf::from("<descriptor set>"),
            cause: e.to_string(),
        })?;
        Ok(Schema::from_pool(pool))
    }

    /// Reads and decodes the descriptor set file at `path`.
    pub fn read_descriptor_set(path: &Path) -> Result<Schema, SchemaError> {
        let bytes = std::fs::read(path).map_err(|cause| SchemaError::Read {
            path: path.to_owned(),
            cause,
        })?;
        let mut schema = Schema::from_descriptor_set(&bytes).map_err(|e| match e {
            SchemaError::DescriptorSet { cause, .. } => SchemaError::DescriptorSet {
                path: path.to_owned(),
                cause,
            },
            other => other,
        })?;
        schema.sources = vec![path.to_owned()];
        Ok(schema)
    }

    /// Loads the schema a policy's `[schema]` table names; relative paths are relative to
    /// `base` (the policy's directory), and no `include` means `base`.
    pub fn load(source: &SchemaSource, base: &Path) -> Result<Schema, SchemaError> {
        match source {
            SchemaSource::Files { files, include } => {
                let files: Vec<PathBuf> = files.iter().map(|f| base.join(f)).collect();
                let includes: Vec<PathBuf> = if include.is_empty() {
                    vec![base.to_owned()]
                } else {
                    include.iter().map(|i| base.join(i)).collect()
                };
                Schema::compile(&files, &includes)
            }
            SchemaSource::DescriptorSet(set) => Schema::read_descriptor_set(&base.join(set)),
        }
    }

    /// The descriptors.
    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    /// Where message `message` (full name), or its field `field`, is declared.
    pub fn location(&self, message: &str, field: Option<&str>) -> Option<Location> {
        let m = self.pool.get_message_by_name(message)?;
        match field {
            None => Some(message_location(&m)),
            Some(f) => m.get_field_by_name(f).map(|f| field_location(&f)),
        }
    }

    /// Whether `other` holds exactly the same descriptors (source info included).
    pub fn same_contents(&self, other: &Schema) -> bool {
        self.encoded == other.encoded
    }

    /// The encoded descriptor set (with source info when compiled from `.proto` files).
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    /// The files the schema was read from: every compiled `.proto` (imports included) or the
    /// descriptor set. Empty for [`Schema::from_pool`] and [`Schema::from_descriptor_set`].
    pub fn sources(&self) -> &[PathBuf] {
        &self.sources
    }
}

fn canonical(path: &Path) -> Result<PathBuf, SchemaError> {
    std::fs::canonicalize(path).map_err(|cause| SchemaError::Read {
        path: path.to_owned(),
        cause,
    })
}

/// Every `.proto` file under `dir`, recursively, in name order.
fn proto_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), SchemaError> {
    let read = |cause| SchemaError::Read {
        path: dir.to_owned(),
        cause,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read)?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            proto_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
