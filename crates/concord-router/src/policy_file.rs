//! Reading the policy file and watching it for changes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use concord_policy::{Policy, PolicyError};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet time after the last change of the file before it is reloaded: editors write a file in
/// several steps (truncate, write, rename), and only the final content should be read.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(150);

/// Why the policy file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid policy:\n{0}")]
    Invalid(#[from] PolicyError),
}

/// Reads and validates the policy file. Returns the policy and the text it was read from.
pub(crate) fn load(path: &Path) -> Result<(Policy, String), PolicyLoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyLoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    let policy = Policy::from_toml_canonical(&text, &path.display().to_string())?;
    Ok((policy, text))
}

/// Watches the directory of `path` and sends `make()` on `reload` once the file has been quiet for
/// [`DEBOUNCE`] after a change. The directory, not the file, is watched, so that editors that
/// replace the file by renaming a new one over it are followed. The returned watcher stops
/// watching when dropped.
pub(crate) fn watch<T: Send + 'static>(
    path: &Path,
    reload: mpsc::Sender<T>,
    make: fn() -> T,
) -> notify::Result<notify::RecommendedWatcher> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(ToOwned::to_owned);
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        let ours = event
            .paths
            .iter()
            .any(|p| p.file_name().map(ToOwned::to_owned) == name);
        if ours {
            // The receiver is gone only when the router is stopping.
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Wait until no change arrived for DEBOUNCE.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if reload.send(make()).await.is_err() {
                return;
            }
        }
    });
    Ok(watcher)
}
