//! A throw-away virtual host with Concord's users and permissions loaded, deleted (with its
//! users) when dropped: what tests and benchmarks run in, so that they run as the systems and
//! the router of a real deployment (never as an administrator) and never see each other.

use std::collections::BTreeMap;

use crate::definitions::{Spec, SystemUser};
use crate::management::{Management, ManagementError, segment};
use crate::password;

/// `amqp://user:password@host_port/vhost` (user, password and vhost percent-encoded).
pub fn amqp_uri(scheme_host_port: &str, user: &str, password: &str, vhost: &str) -> String {
    let (scheme, host_port) = scheme_host_port
        .split_once("://")
        .unwrap_or(("amqp", scheme_host_port));
    format!(
        "{scheme}://{}:{}@{}/{}",
        segment(user),
        segment(password),
        host_port.trim_end_matches('/'),
        segment(vhost)
    )
}

/// The broker a scratch vhost lives on: its management API (as an administrator) and the
/// `scheme://host:port` of its AMQP listener.
#[derive(Debug, Clone)]
pub struct Broker {
    pub management: Management,
    pub amqp: String,
}

impl Broker {
    /// The broker of the environment: `CONCORD_MANAGEMENT_URL` (default
    /// `http://127.0.0.1:15672`), `CONCORD_ADMIN_USER` / `CONCORD_ADMIN_PASSWORD` (default
    /// guest/guest) and `CONCORD_AMQP_ADDR` (default `amqp://127.0.0.1:5672`).
    pub fn from_env() -> Broker {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
        Broker {
            management: Management::new(
                &var("CONCORD_MANAGEMENT_URL", "http://127.0.0.1:15672"),
                &var("CONCORD_ADMIN_USER", "guest"),
                &var("CONCORD_ADMIN_PASSWORD", "guest"),
            ),
            amqp: var("CONCORD_AMQP_ADDR", "amqp://127.0.0.1:5672"),
        }
    }
}

/// A virtual host named `name` whose namespace is `name` too, with one user per system
/// (`{name}.{system}`), a router user (`{name}.router`) and an operator user
/// (`{name}.operator`), each with a generated password and the permissions of
/// [`Spec::users`].
#[derive(Debug)]
pub struct ScratchVhost {
    broker: Broker,
    spec: Spec,
    passwords: BTreeMap<String, String>,
}

impl ScratchVhost {
    /// Creates the vhost and its users (`systems` may be empty and grow with
    /// [`ScratchVhost::add_system`]).
    pub fn create(broker: Broker, name: &str, systems: &[&str]) -> Result<Self, ManagementError> {
        let spec = Spec {
            vhost: name.to_owned(),
            namespace: name.to_owned(),
            systems: Vec::new(),
            router_user: format!("{name}.router"),
            operator_user: format!("{name}.operator"),
        };
        let mut scratch = ScratchVhost {
            broker,
            spec,
            passwords: BTreeMap::new(),
        };
        // Deleted again by `drop` if loading fails half-way.
        scratch.broker.management.create_vhost(name)?;
        for system in systems {
            scratch.push_system(system);
        }
        scratch.load()?;
        Ok(scratch)
    }

    fn push_system(&mut self, system: &str) {
        let user = format!("{}.{system}", self.spec.vhost);
        self.spec.systems.push(SystemUser {
            system: system.to_owned(),
            user,
        });
    }

    fn load(&mut self) -> Result<(), ManagementError> {
        let mut users: Vec<String> = self.spec.systems.iter().map(|s| s.user.clone()).collect();
        users.push(self.spec.router_user.clone());
        users.push(self.spec.operator_user.clone());
        for user in users {
            self.passwords
                .entry(user)
                .or_insert_with(password::generate);
        }
        self.broker
            .management
            .load_definitions(&self.spec.users(&self.passwords))
    }

    /// Adds a system (its user and permissions; the others' are loaded again unchanged).
    pub fn add_system(&mut self, system: &str) -> Result<(), ManagementError> {
        self.push_system(system);
        self.load()
    }

    /// The vhost's name (also the namespace of its exchanges and queues).
    pub fn name(&self) -> &str {
        &self.spec.vhost
    }

    /// The definitions' specification (users and their systems).
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The broker user of `system`.
    pub fn system_user(&self, system: &str) -> String {
        format!("{}.{system}", self.spec.vhost)
    }

    /// The router's broker user.
    pub fn router_user(&self) -> &str {
        &self.spec.router_user
    }

    /// The operator's broker user.
    pub fn operator_user(&self) -> &str {
        &self.spec.operator_user
    }

    /// The user-to-system map of the router's configuration.
    pub fn users(&self) -> BTreeMap<String, String> {
        self.spec
            .systems
            .iter()
            .map(|s| (s.user.clone(), s.system.clone()))
            .collect()
    }

    /// The AMQP URI of `user` (one of this vhost's) on the broker.
    pub fn uri(&self, user: &str) -> String {
        let password = self.passwords.get(user).map_or("", String::as_str);
        amqp_uri(&self.broker.amqp, user, password, &self.spec.vhost)
    }

    /// The password of `user`.
    pub fn password(&self, user: &str) -> Option<&str> {
        self.passwords.get(user).map(String::as_str)
    }

    /// The AMQP URI of `system`'s user.
    pub fn system_uri(&self, system: &str) -> String {
        self.uri(&self.system_user(system))
    }

    /// The AMQP URI of the router's user.
    pub fn router_uri(&self) -> String {
        self.uri(&self.spec.router_user)
    }

    /// The AMQP URI of the operator's user.
    pub fn operator_uri(&self) -> String {
        self.uri(&self.spec.operator_user)
    }
}

impl Drop for ScratchVhost {
    fn drop(&mut self) {
        let m = &self.broker.management;
        let _ = m.delete_vhost(&self.spec.vhost);
        for user in self.passwords.keys() {
            let _ = m.delete_user(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_percent_encoded() {
        assert_eq!(
            amqp_uri("amqp://127.0.0.1:5672", "it-a.orders", "p/w", "it-a"),
            "amqp://it-a.orders:p%2Fw@127.0.0.1:5672/it-a"
        );
        assert_eq!(
            amqp_uri("amqps://h:5671/", "u", "p", "/"),
            "amqps://u:p@h:5671/%2F"
        );
    }
}
