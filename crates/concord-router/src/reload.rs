//! Reloading the policy file and the schema it names, together, while the router runs.

use std::sync::Arc;

use concord_amqp::Connection;
use concord_schema::LoadError;
use tracing::{error, info, warn};

use crate::metrics::ReloadResultLabel;
use crate::policy_file;
use crate::state::{PolicyState, ReloadOutcome, Shared};

/// Reloads the policy file and the schema it names, together. A new schema that breaks
/// fields the policy in force uses is refused (see [`concord_schema::diff::for_policy`]).
/// With a connection, the new policy's inboxes are declared before it takes effect;
/// without one, the next session declares them.
pub(crate) async fn reload(shared: &Shared, conn: Option<&Connection>) -> ReloadOutcome {
    let path = &shared.policy_path;
    let deployment = match policy_file::load(path) {
        Ok(loaded) => loaded,
        Err(e) if e.is_unreadable_policy() => {
            shared.metrics.reload(ReloadResultLabel::Error);
            error!(error = %e, "policy reload failed; the old policy stays in force");
            return ReloadOutcome::Failed(e.to_string());
        }
        Err(e) => {
            shared.metrics.reload(ReloadResultLabel::Invalid);
            let problems = match &e {
                LoadError::Policy(p) => p.problems.iter().map(ToString::to_string).collect(),
                other => vec![other.to_string()],
            };
            for p in &problems {
                warn!(problem = %p, "policy reload refused");
            }
            error!(
                path = %path.display(),
                problems = problems.len(),
                "the new policy or its schema is invalid; the old ones stay in force"
            );
            return ReloadOutcome::Refused(e.to_string());
        }
    };
    let current = shared.policy.load_full();
    if current.deployment.same_as(&deployment) {
        shared.metrics.reload(ReloadResultLabel::Unchanged);
        info!(path = %path.display(), "policy and schema unchanged");
        return ReloadOutcome::Unchanged;
    }
    let diff = concord_schema::diff::for_policy(current.policy(), deployment.schema.pool());
    if diff.is_breaking() {
        shared.metrics.reload(ReloadResultLabel::Breaking);
        let problems: Vec<String> = diff
            .breaking
            .iter()
            .map(|c| format!("{}: breaking schema change: {c}", path.display()))
            .collect();
        for p in &problems {
            warn!(problem = %p, "policy reload refused");
        }
        error!(
            path = %path.display(),
            problems = problems.len(),
            "the new schema breaks fields the policy in force uses; the old policy and schema \
             stay in force (to remove a field, drop it from the policy first, then from the schema)"
        );
        return ReloadOutcome::Refused(problems.join("\n"));
    }
    for change in &diff.additions {
        info!(%change, "schema addition");
    }
    let state = PolicyState {
        handles: shared.metrics.handles(&deployment.policy),
        deployment,
    };
    if let Some(conn) = conn
        && let Err(e) = shared.declare(conn, &state).await
    {
        shared.metrics.reload(ReloadResultLabel::Error);
        error!(error = %e, "declaring the new policy's inboxes failed; the old policy stays in force");
        return ReloadOutcome::Failed(format!("declaring the inboxes failed: {e}"));
    }
    let systems = state.policy().systems().to_vec();
    let watched = state.deployment.watched_paths().to_vec();
    shared.policy.store(Arc::new(state));
    shared.follow(&watched);
    shared.metrics.reload(ReloadResultLabel::Applied);
    shared.reloads_applied.send_modify(|n| *n += 1);
    info!(path = %path.display(), ?systems, "policy reloaded");
    ReloadOutcome::Applied { systems }
}
