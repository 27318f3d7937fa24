//! RabbitMQ definitions (the JSON of `rabbitmqctl import_definitions` and
//! `POST /api/definitions`) that make the broker enforce Concord's isolation:
//!
//! | user | may publish | may read |
//! |---|---|---|
//! | a system's | `{ns}.ingress` with routing keys `<its system>.<entity>` only; `{ns}.dlx` with key `<its system>` only (its own dead letters) | its inbox `{ns}.inbox.<system>` and its DLQ `{ns}.dlq.<system>` |
//! | the router's | `{ns}.routed` and `{ns}.dlx` (key `router`) | its input queue(s) |
//! | the operator's | everything in the namespace | everything in the namespace |
//!
//! Nobody may publish to the default exchange (so no queue is reachable by name), no system
//! user may declare, bind, delete or purge anything, and only the operator may read the router's
//! dead letters (`{ns}.dlq.router`, which hold whole original messages).

use std::collections::BTreeMap;

use concord_amqp::{Arg, Arguments, Plan};
use serde::Serialize;

use crate::password;

/// One system of the policy and the broker user it connects as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemUser {
    pub system: String,
    pub user: String,
}

/// What the definitions are made of.
#[derive(Debug, Clone)]
pub struct Spec {
    pub vhost: String,
    pub namespace: String,
    pub systems: Vec<SystemUser>,
    pub router_user: String,
    pub operator_user: String,
}

/// The definitions document.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Definitions {
    pub users: Vec<User>,
    pub vhosts: Vec<Vhost>,
    pub permissions: Vec<Permission>,
    pub topic_permissions: Vec<TopicPermission>,
    pub exchanges: Vec<Exchange>,
    pub queues: Vec<Queue>,
    pub bindings: Vec<Binding>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct User {
    pub name: String,
    pub password_hash: String,
    pub hashing_algorithm: String,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Vhost {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Permission {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopicPermission {
    pub user: String,
    pub vhost: String,
    pub exchange: String,
    pub write: String,
    pub read: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Exchange {
    pub name: String,
    pub vhost: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Queue {
    pub name: String,
    pub vhost: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub arguments: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Binding {
    pub source: String,
    pub vhost: String,
    pub destination: String,
    pub destination_type: String,
    pub routing_key: String,
    pub arguments: BTreeMap<String, serde_json::Value>,
}

/// A regular expression matching exactly `s`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The read permission of `system`'s user: its inbox and its dead-letter queue.
pub fn system_read(namespace: &str, system: &str) -> String {
    format!("^{}\\.(inbox|dlq)\\.{}$", escape(namespace), escape(system))
}

/// The read permission of `system`'s user while `concord pause` holds it: its dead-letter queue
/// only, so it cannot consume its inbox.
pub fn paused_system_read(namespace: &str, system: &str) -> String {
    format!("^{}\\.dlq\\.{}$", escape(namespace), escape(system))
}

/// Matches nothing.
const NOTHING: &str = "^$";

impl Spec {
    /// The users and their permissions; `passwords` maps each user to its password, which only
    /// its hash leaves.
    pub fn users(&self, passwords: &BTreeMap<String, String>) -> Definitions {
        let ns = escape(&self.namespace);
        let hash = |user: &str| password::hash(passwords.get(user).map_or("", String::as_str));
        let mut d = Definitions {
            vhosts: vec![Vhost {
                name: self.vhost.clone(),
            }],
            ..Definitions::default()
        };
        let user = |name: &str, tags: &[&str]| User {
            name: name.to_owned(),
            password_hash: hash(name),
            hashing_algorithm: password::HASHING_ALGORITHM.to_owned(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        };
        let permission = |user: &str, configure: String, write: String, read: String| Permission {
            user: user.to_owned(),
            vhost: self.vhost.clone(),
            configure,
            write,
            read,
        };
        let topic = |user: &str, exchange: String, write: String| TopicPermission {
            user: user.to_owned(),
            vhost: self.vhost.clone(),
            exchange,
            write,
            read: NOTHING.to_owned(),
        };
        for s in &self.systems {
            let sys = escape(&s.system);
            d.users.push(user(&s.user, &[]));
            d.permissions.push(permission(
                &s.user,
                NOTHING.to_owned(),
                format!("^{ns}\\.(ingress|dlx|resync)$"),
                system_read(&self.namespace, &s.system),
            ));
            d.topic_permissions.push(topic(
                &s.user,
                format!("{}.ingress", self.namespace),
                format!("^{sys}\\.[a-z0-9_-]+$"),
            ));
            // The backfill lane: its own records only, under its own name.
            d.topic_permissions.push(topic(
                &s.user,
                format!("{}.resync", self.namespace),
                format!("^{sys}\\.[a-z0-9_-]+$"),
            ));
            d.topic_permissions.push(topic(
                &s.user,
                format!("{}.dlx", self.namespace),
                format!("^{sys}$"),
            ));
        }
        let router_queues = "router(\\.p[0-9]+|\\.resync|\\.control)?";
        d.users.push(user(&self.router_user, &[]));
        d.permissions.push(permission(
            &self.router_user,
            format!("^{ns}\\."),
            format!(
                "^{ns}\\.(routed|dlx|control|partition|{router_queues}|inbox\\.[a-z0-9_-]+|dlq\\.[a-z0-9_-]+)$"
            ),
            // Declaring a queue with a dead-letter exchange needs read on the queue: the router
            // declares the inboxes (it never consumes them).
            format!("^{ns}\\.(ingress|resync|control|routed|dlx|partition|{router_queues}|inbox\\.[a-z0-9_-]+)$"),
        ));
        // Binding a queue to a topic exchange needs topic read permission for the binding key:
        // the router binds every DLQ, and publishes its own dead letters only.
        d.topic_permissions.push(TopicPermission {
            read: ".*".to_owned(),
            ..topic(
                &self.router_user,
                format!("{}.dlx", self.namespace),
                "^router$".to_owned(),
            )
        });
        d.users.push(user(&self.operator_user, &["management"]));
        d.permissions.push(permission(
            &self.operator_user,
            format!("^{ns}\\."),
            format!("^{ns}\\."),
            format!("^{ns}\\."),
        ));
        d
    }

    /// The users and their permissions ([`Spec::users`]) and the topology of `plan` (what the
    /// router declares: `concord_amqp::Topology::plan`), in one document.
    pub fn definitions(&self, plan: &Plan, passwords: &BTreeMap<String, String>) -> Definitions {
        let mut d = self.users(passwords);
        let vhost = || self.vhost.clone();
        d.exchanges = plan
            .exchanges
            .iter()
            .map(|e| Exchange {
                name: e.name.clone(),
                vhost: vhost(),
                kind: e.kind.clone(),
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: json_arguments(&e.arguments),
            })
            .collect();
        d.queues = plan
            .queues
            .iter()
            .map(|q| Queue {
                name: q.name.clone(),
                vhost: vhost(),
                durable: true,
                auto_delete: false,
                arguments: json_arguments(&q.arguments),
            })
            .collect();
        d.bindings = plan
            .bindings
            .iter()
            .map(|b| Binding {
                source: b.source.clone(),
                vhost: vhost(),
                destination: b.destination.clone(),
                destination_type: if b.destination_is_exchange {
                    "exchange"
                } else {
                    "queue"
                }
                .to_owned(),
                routing_key: b.routing_key.clone(),
                arguments: BTreeMap::new(),
            })
            .collect();
        d
    }
}

fn json_arguments(arguments: &Arguments) -> BTreeMap<String, serde_json::Value> {
    arguments
        .iter()
        .map(|(name, value)| {
            let value = match value {
                Arg::Text(s) => serde_json::Value::from(s.as_str()),
                Arg::Int(i) => serde_json::Value::from(*i),
                Arg::Bool(b) => serde_json::Value::from(*b),
            };
            (name.clone(), value)
        })
        .collect()
}
