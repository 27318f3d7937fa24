//! The state the supervisor, its sessions and the handle share: the configuration, the policy
//! in force, readiness, the metrics, and the requests the supervisor takes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use concord_amqp::{AmqpError, Connection, Topology};
use concord_policy::{Policy, RouterSettings};
use concord_schema::Deployment;
use tokio::sync::{oneshot, watch};
use tracing::warn;

use crate::config::RouterConfig;
use crate::metrics::{Handles, Metrics};
use crate::policy_file::DeploymentWatcher;

/// The router's only read of the wall clock: milliseconds since the Unix epoch.
pub(crate) use concord_amqp::now_ms;

/// Bound of closing a connection or channel during teardown (the one
/// [`concord_amqp::Connection::close`] applies by itself).
pub(crate) use concord_amqp::CLOSE_TIMEOUT;

/// The policy in force and its schema, with the metric handles of its label values.
#[derive(Debug)]
pub(crate) struct PolicyState {
    pub(crate) deployment: Deployment,
    pub(crate) handles: Handles,
}

impl PolicyState {
    pub(crate) fn policy(&self) -> &Policy {
        &self.deployment.policy
    }
}

/// Whether the router routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Connecting, or disconnected and about to reconnect.
    NotReady,
    /// Connected, topology declared, consuming.
    Ready,
    /// The router stopped (shut down, or failed for good).
    Stopped,
}

/// Requests to the supervisor.
#[derive(Debug)]
pub(crate) enum Control {
    /// Reload the policy file; the outcome is sent back if a reply channel is given.
    Reload(Option<oneshot::Sender<ReloadOutcome>>),
}

/// The result of a policy reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new policy is valid and in force; the inboxes of its systems are declared.
    Applied {
        /// The systems of the new policy.
        systems: Vec<String>,
    },
    /// The files hold the policy and schema already in force.
    Unchanged,
    /// The new policy or schema is invalid, or the new schema breaks fields the policy in
    /// force uses, and was refused; the old policy and schema keep running. One line per
    /// problem.
    Refused(String),
    /// The file could not be read, or the inboxes of the new policy could not be declared;
    /// the old policy keeps running.
    Failed(String),
}

/// State shared by the supervisor, its sessions and the handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: RouterConfig,
    /// The broker user the router logs in as: the `user_id` of everything it publishes.
    pub(crate) login: String,
    /// How it connects (TLS included).
    pub(crate) connect_options: concord_amqp::ConnectOptions,
    pub(crate) settings: RouterSettings,
    pub(crate) topology: Topology,
    /// Names of the consuming and the publishing connection.
    pub(crate) connection_names: [String; 2],
    pub(crate) policy_path: PathBuf,
    pub(crate) policy: ArcSwap<PolicyState>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) ready: Arc<AtomicBool>,
    pub(crate) ready_tx: watch::Sender<Readiness>,
    /// Sessions started (connected and consuming) so far.
    pub(crate) sessions: watch::Sender<u64>,
    /// Policy reloads applied so far.
    pub(crate) reloads_applied: watch::Sender<u64>,
    /// Watches the files of the deployment in force (`watch_policy`).
    pub(crate) watcher: Mutex<Option<DeploymentWatcher>>,
}

impl Shared {
    /// Watches the files of the deployment now in force (when `watch_policy` is on).
    pub(crate) fn follow(&self, paths: &[PathBuf]) {
        let Ok(mut watcher) = self.watcher.lock() else {
            return;
        };
        if let Some(w) = watcher.as_mut()
            && let Err(e) = w.follow(paths)
        {
            warn!(error = %e, "cannot watch the files of the new policy and schema; SIGHUP still reloads");
        }
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        if ready {
            self.sessions.send_modify(|n| *n += 1);
        }
        self.ready.store(ready, Ordering::Relaxed);
        self.metrics.set_connected(ready);
        self.ready_tx.send_replace(if ready {
            Readiness::Ready
        } else {
            Readiness::NotReady
        });
    }

    /// Marks the router stopped for good (after its last session).
    pub(crate) fn set_stopped(&self) {
        self.set_ready(false);
        self.ready_tx.send_replace(Readiness::Stopped);
    }

    /// Declares the whole router topology for `state`'s systems on a scratch channel of `conn`.
    pub(crate) async fn declare(
        &self,
        conn: &Connection,
        state: &PolicyState,
    ) -> Result<(), AmqpError> {
        let channel = conn.open_channel().await?;
        let result = self
            .topology
            .declare_router(&channel, state.policy().systems())
            .await;
        if channel.is_connected() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close()).await;
        }
        result
    }
}
