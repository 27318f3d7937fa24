//! Loading the deployment (the policy file and the schema it names) and watching its files for
//! changes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_schema::{Deployment, LoadError};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::warn;

/// Quiet time after the last change of a file before the deployment is reloaded: editors write
/// a file in several steps (truncate, write, rename), and a schema change often touches the
/// policy and a `.proto` file; only the final content should be read.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(150);

/// Reads the policy file, loads the schema it names and validates the policy against it.
pub(crate) fn load(path: &Path) -> Result<Deployment, LoadError> {
    Deployment::load(path)
}

/// What a change must touch to count: a file (by its directory and name), or anything under a
/// directory.
///
/// A file may be a symbolic link whose target is swapped rather than written: Kubernetes
/// mounts a ConfigMap's keys as `policy.toml -> ..data/policy.toml` and updates them by pointing
/// `..data` at a new directory (one rename), which touches neither the file's name nor its
/// content in place. So a change in a file's directory also counts when the file now resolves
/// to another path than when it was last seen.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Targets {
    /// Each file, with what it resolved to (its canonical path) when last seen.
    files: BTreeMap<PathBuf, Option<PathBuf>>,
    dirs: BTreeSet<PathBuf>,
}

impl Targets {
    fn of(paths: &[PathBuf]) -> Targets {
        let mut t = Targets::default();
        for p in paths {
            // Watch events carry absolute paths.
            let abs = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            if abs.is_dir() {
                t.dirs.insert(abs);
            } else {
                let resolved = std::fs::canonicalize(&abs).ok();
                t.files.insert(abs, resolved);
            }
        }
        t
    }

    /// The directories to watch: the parents of the files (not recursive: editors replace a
    /// file by renaming a new one over it, which a watch on the file itself would lose) and
    /// the directories (recursive).
    fn watches(&self) -> BTreeSet<(PathBuf, bool)> {
        let mut w: BTreeSet<(PathBuf, bool)> = self
            .files
            .keys()
            .filter_map(|f| f.parent().map(|d| (d.to_owned(), false)))
            .collect();
        w.extend(self.dirs.iter().map(|d| (d.clone(), true)));
        w
    }

    /// Whether a change of `path` concerns the deployment (a file resolving elsewhere now is
    /// remembered as seen).
    fn touched_by(&mut self, path: &Path) -> bool {
        if self.files.contains_key(path) || self.dirs.iter().any(|d| path.starts_with(d)) {
            return true;
        }
        let mut swapped = false;
        for (file, resolved) in &mut self.files {
            if file.parent() == path.parent() {
                let now = std::fs::canonicalize(file).ok();
                if now != *resolved {
                    *resolved = now;
                    swapped = true;
                }
            }
        }
        swapped
    }
}

/// Watches the files of a deployment: sends `make()` on `reload` once they have been quiet for
/// [`DEBOUNCE`] after a change. Call [`DeploymentWatcher::follow`] after a reload: the
/// deployment may now consist of other files. Stops watching when dropped.
pub(crate) struct DeploymentWatcher {
    watcher: notify::RecommendedWatcher,
    targets: Arc<Mutex<Targets>>,
    watching: BTreeSet<(PathBuf, bool)>,
}

impl std::fmt::Debug for DeploymentWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeploymentWatcher")
            .field("watching", &self.watching)
            .finish_non_exhaustive()
    }
}

impl DeploymentWatcher {
    pub(crate) fn start<T: Send + 'static>(
        paths: &[PathBuf],
        reload: mpsc::Sender<T>,
        make: fn() -> T,
    ) -> notify::Result<DeploymentWatcher> {
        let targets = Arc::new(Mutex::new(Targets::default()));
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let seen = targets.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            let ours = match seen.lock() {
                // Every path is looked at (no short cut): each swapped link is remembered.
                Ok(mut t) => event
                    .paths
                    .iter()
                    .fold(false, |ours, p| t.touched_by(p) | ours),
                Err(_) => true,
            };
            if ours {
                // The receiver is gone only when the router is stopping.
                let _ = tx.send(());
            }
        })?;
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
        let mut w = DeploymentWatcher {
            watcher,
            targets,
            watching: BTreeSet::new(),
        };
        w.follow(paths)?;
        Ok(w)
    }

    /// Watches `paths` (the files and directories of the deployment in force) instead of the
    /// previous ones.
    pub(crate) fn follow(&mut self, paths: &[PathBuf]) -> notify::Result<()> {
        let targets = Targets::of(paths);
        let wanted = targets.watches();
        for (dir, recursive) in wanted.difference(&self.watching) {
            let mode = if *recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            self.watcher.watch(dir, mode)?;
        }
        for (dir, _) in self.watching.difference(&wanted) {
            if !wanted.iter().any(|(d, _)| d == dir)
                && let Err(e) = self.watcher.unwatch(dir)
            {
                warn!(dir = %dir.display(), error = %e, "cannot stop watching");
            }
        }
        self.watching = wanted;
        if let Ok(mut t) = self.targets.lock() {
            *t = targets;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_may_not_name_a_system_after_the_routers_dead_letter_queue() {
        // The policy refuses the names the router reserves (so `concord check` refuses them too).
        assert!(
            concord_policy::RESERVED_SYSTEM_NAMES.contains(&concord_amqp::topology::ROUTER_DLQ_KEY)
        );
    }

    /// A Kubernetes ConfigMap update: `policy.toml -> ..data/policy.toml`, and `..data` is
    /// pointed at a new directory by renaming a new link over it.
    #[cfg(unix)]
    #[test]
    fn a_swapped_link_counts_as_a_change_of_the_file() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..v1")).unwrap();
        std::fs::write(d.join("..v1/policy.toml"), "v1").unwrap();
        symlink("..v1", d.join("..data")).unwrap();
        symlink("..data/policy.toml", d.join("policy.toml")).unwrap();
        let mut t = Targets::of(&[d.join("policy.toml")]);
        // Something else in the directory changes: not ours.
        assert!(!t.touched_by(&d.join("unrelated")));
        std::fs::create_dir(d.join("..v2")).unwrap();
        std::fs::write(d.join("..v2/policy.toml"), "v2").unwrap();
        symlink("..v2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        // The rename's event names `..data`, not the file: the file resolves elsewhere now.
        assert!(t.touched_by(&d.join("..data")));
        // Seen once: the next event in the directory is not a change of the file.
        assert!(!t.touched_by(&d.join("..v1")));
    }

    #[test]
    fn targets_are_files_by_name_and_directories_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        let policy = dir.path().join("policy.toml");
        let mut t = Targets::of(&[policy.clone(), model.clone()]);
        assert!(t.touched_by(&policy));
        assert!(t.touched_by(&model.join("sub/order.proto")));
        assert!(!t.touched_by(&dir.path().join("other.toml")));
        let w = t.watches();
        assert!(w.contains(&(dir.path().to_owned(), false)));
        assert!(w.contains(&(model, true)));
    }
}
