//! `concord pause|resume --system S`: stop delivering to a system while its inbox accumulates,
//! without the adapter's cooperation.
//!
//! Pausing narrows the read permission of the system's broker user from its inbox and DLQ
//! ([`system_read`], what `concord broker-defs` grants) to its DLQ only
//! ([`paused_system_read`]), then closes that user's connections to the vhost (the broker keeps
//! a consumer that exists, whatever the permissions) until the management API shows no consumer
//! of that user on the inbox for longer than its statistics interval (connections and
//! consumers appear there only with the next sample). The adapter reconnects with backoff and
//! its `basic.consume` of the inbox is refused, again and again, until resumed: it applies
//! nothing and reports not ready on `/readyz`. The router keeps routing to the inbox, which
//! accumulates (nothing is unroutable, nothing is lost); what was delivered but not acked when
//! the connection closed is requeued and deduplicated on redelivery. Resuming restores the
//! permission; the adapter's next reconnect (within its backoff, at most about 20 s) consumes
//! the backlog.
//!
//! The adapter's session is one connection for both directions, so while paused the system's
//! own local changes wait in its change feed (and outbox) too and are published after the
//! resume. Changing permissions and closing other users' connections needs a broker user with
//! the `administrator` tag. Loading the definitions again (`concord broker-defs --load`)
//! resumes every system.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::definitions::{paused_system_read, system_read};
use crate::management::{Management, ManagementError};

/// Whether a system user's read permission is that of a running or a paused system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Paused,
    /// A permission `concord broker-defs` does not write: left alone.
    Other,
}

/// The state `read` (a user's read permission) means for `system` in namespace `ns`.
pub fn state_of(read: &str, ns: &str, system: &str) -> State {
    if read == system_read(ns, system) {
        State::Running
    } else if read == paused_system_read(ns, system) {
        State::Paused
    } else {
        State::Other
    }
}

/// Why pausing or resuming failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PauseError {
    #[error(transparent)]
    Management(#[from] ManagementError),
    #[error(
        "no broker user of vhost {vhost:?} has the read permission of system {system:?} ({expected:?}); name it with --broker-user"
    )]
    NoUser {
        vhost: String,
        system: String,
        expected: String,
    },
    #[error(
        "several broker users read system {system:?}'s inbox ({users:?}); name one with --broker-user"
    )]
    SeveralUsers { system: String, users: Vec<String> },
    #[error(
        "broker user {user:?} still consumes {queue} after {seconds} s (its connections are closed as the management API lists them)"
    )]
    StillConsuming {
        user: String,
        queue: String,
        seconds: u64,
    },
    #[error(
        "broker user {user:?} reads {read:?} in vhost {vhost:?}, not what `concord broker-defs` grants system {system:?}: left alone"
    )]
    Unexpected {
        user: String,
        vhost: String,
        system: String,
        read: String,
    },
}

/// What a pause or resume did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub system: String,
    pub user: String,
    /// The state found.
    pub before: State,
    /// The state left.
    pub after: State,
    /// Connections of the user closed.
    pub closed_connections: usize,
}

/// The target: vhost, namespace, system and (optionally) its broker user.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub vhost: &'a str,
    pub namespace: &'a str,
    pub system: &'a str,
    pub user: Option<&'a str>,
    /// How long a pause keeps closing the user's connections and checking its inbox has no
    /// consumer of it: longer than the management API's statistics interval
    /// (`collect_statistics_interval`, 5 s by default), since a connection or consumer appears
    /// in the API only with the next sample.
    pub settle: Duration,
    /// How long a pause may take before it reports the inbox still consumed.
    pub timeout: Duration,
}

fn find_user(m: &Management, t: &Target<'_>) -> Result<String, PauseError> {
    if let Some(user) = t.user {
        return Ok(user.to_owned());
    }
    let users: Vec<String> = m
        .permissions(t.vhost)?
        .into_iter()
        .filter(|p| state_of(&p.read, t.namespace, t.system) != State::Other)
        .map(|p| p.user)
        .collect();
    match users.as_slice() {
        [] => Err(PauseError::NoUser {
            vhost: t.vhost.to_owned(),
            system: t.system.to_owned(),
            expected: system_read(t.namespace, t.system),
        }),
        [one] => Ok(one.clone()),
        _ => Err(PauseError::SeveralUsers {
            system: t.system.to_owned(),
            users,
        }),
    }
}

fn current(m: &Management, t: &Target<'_>, user: &str) -> Result<(State, String), PauseError> {
    let read = m
        .permission(t.vhost, user)?
        .map(|p| p.read)
        .unwrap_or_default();
    Ok((state_of(&read, t.namespace, t.system), read))
}

fn set_read(m: &Management, t: &Target<'_>, user: &str, read: String) -> Result<(), PauseError> {
    let mut p = m.permission(t.vhost, user)?.unwrap_or_default();
    p.user = user.to_owned();
    p.vhost = t.vhost.to_owned();
    p.read = read;
    Ok(m.set_permission(&p)?)
}

/// Pauses the system (idempotent: pausing a paused system closes its connections again).
pub fn pause(m: &Management, t: &Target<'_>) -> Result<Outcome, PauseError> {
    let (user, before) = switch(m, t, State::Paused, || {
        paused_system_read(t.namespace, t.system)
    })?;
    let closed = close_until_idle(m, t, &user)?;
    Ok(Outcome {
        system: t.system.to_owned(),
        user,
        before,
        after: State::Paused,
        closed_connections: closed,
    })
}

/// Gives the system's user the read permission of state `to` (`read`), unless it has it
/// already; a permission that is neither a running nor a paused system's is refused. Returns
/// the user and the state before.
fn switch(
    m: &Management,
    t: &Target<'_>,
    to: State,
    read: impl FnOnce() -> String,
) -> Result<(String, State), PauseError> {
    let user = find_user(m, t)?;
    let (before, current_read) = current(m, t, &user)?;
    match before {
        State::Other => {
            return Err(PauseError::Unexpected {
                user,
                vhost: t.vhost.to_owned(),
                system: t.system.to_owned(),
                read: current_read,
            });
        }
        s if s == to => {}
        _ => set_read(m, t, &user, read())?,
    }
    Ok((user, before))
}

/// Closes `user`'s connections until its inbox has no consumer of it, as the management API
/// reports both (sampled): for at least `t.settle`, at most `t.timeout`. Returns how many
/// connections were closed.
fn close_until_idle(m: &Management, t: &Target<'_>, user: &str) -> Result<usize, PauseError> {
    let inbox = format!("{}.inbox.{}", t.namespace, t.system);
    let reason = format!("concord pause --system {}", t.system);
    let start = Instant::now();
    let mut closed = 0;
    loop {
        for c in m.connections(t.vhost)? {
            if c.user == user {
                m.close_connection(&c.name, &reason)?;
                closed += 1;
            }
        }
        let consuming = m
            .consumers(t.vhost)?
            .iter()
            .any(|c| c.queue.name == inbox && c.channel_details.user == user);
        let waited = start.elapsed();
        if !consuming && waited >= t.settle {
            return Ok(closed);
        }
        if waited >= t.timeout {
            return Err(PauseError::StillConsuming {
                user: user.to_owned(),
                queue: inbox,
                seconds: waited.as_secs(),
            });
        }
        // The API is sampled: look again shortly.
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Resumes the system (idempotent).
pub fn resume(m: &Management, t: &Target<'_>) -> Result<Outcome, PauseError> {
    let (user, before) = switch(m, t, State::Running, || system_read(t.namespace, t.system))?;
    Ok(Outcome {
        system: t.system.to_owned(),
        user,
        before,
        after: State::Running,
        closed_connections: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_permission_tells_running_from_paused() {
        assert_eq!(
            state_of(r"^ns\.(inbox|dlq)\.crm$", "ns", "crm"),
            State::Running
        );
        assert_eq!(state_of(r"^ns\.dlq\.crm$", "ns", "crm"), State::Paused);
        assert_eq!(state_of(".*", "ns", "crm"), State::Other);
        assert_eq!(
            state_of(r"^ns\.(inbox|dlq)\.crm$", "ns", "erp"),
            State::Other
        );
        // Names are escaped: `a-b` and the dots of a namespace match themselves only.
        assert_eq!(
            paused_system_read("it.x", "a-b"),
            r"^it\.x\.dlq\.a\-b$".to_owned()
        );
    }
}
