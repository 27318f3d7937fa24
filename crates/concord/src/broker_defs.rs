//! `concord broker-defs`: the RabbitMQ definitions that make the broker enforce the policy's
//! isolation (users, permissions, topic permissions, and the topology the router declares),
//! written as JSON or loaded into a broker through its management API.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use concord_admin::definitions::{Definitions, Spec, SystemUser};
use concord_admin::management::Management;
use concord_admin::password;
use concord_router::RouterConfig;

/// What `broker-defs` was asked for.
#[derive(Debug)]
pub(crate) struct Request<'a> {
    pub policy: &'a Path,
    pub config: Option<&'a Path>,
    pub vhost: Option<String>,
    pub router_user: String,
    pub operator_user: String,
}

/// The environment variable holding `user`'s password: `CONCORD_BROKER_PASSWORD_<USER>`,
/// upper-cased, every character other than a letter or digit as `_`.
pub(crate) fn password_variable(user: &str) -> String {
    let mut name = String::from("CONCORD_BROKER_PASSWORD_");
    name.extend(user.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    name
}

/// The vhost of an AMQP URI (its path, percent-decoded; `/` when it has none); of the first
/// URI of a list.
fn vhost_of(uri: &str) -> String {
    let uri = concord_amqp::split_uris(uri)
        .into_iter()
        .next()
        .unwrap_or(uri);
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let path = rest.split_once('/').map_or("", |(_, path)| path);
    let path = path.split(['?', '#']).next().unwrap_or("");
    if path.is_empty() {
        return "/".to_owned();
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The definitions document and the passwords that were generated (user → password), which
/// the caller prints once.
pub(crate) struct Output {
    pub definitions: Definitions,
    pub generated: BTreeMap<String, String>,
}

/// Builds the definitions: one user per system of the policy (named by the router's `[users]`
/// map, or after the system), the router's and the operator's; passwords from
/// `CONCORD_BROKER_PASSWORD_<USER>` or generated.
pub(crate) fn build(request: &Request<'_>) -> anyhow::Result<Output> {
    let deployment = crate::explain::load_deployment(request.policy)?;
    let config = match request.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            RouterConfig::from_toml(&text, &path.display().to_string())?
        }
        None => RouterConfig::default(),
    };
    let systems: Vec<String> = deployment.policy.systems().to_vec();
    let mut user_of: BTreeMap<&str, &str> = BTreeMap::new();
    for (user, system) in &config.users {
        anyhow::ensure!(
            systems.contains(system),
            "[users] maps {user:?} to {system:?}, which is not a system of {}",
            request.policy.display()
        );
        if let Some(other) = user_of.insert(system, user) {
            anyhow::bail!("[users] maps both {other:?} and {user:?} to system {system:?}");
        }
    }
    let spec = Spec {
        vhost: request
            .vhost
            .clone()
            .unwrap_or_else(|| vhost_of(&config.amqp_uri)),
        namespace: config.namespace.clone(),
        systems: systems
            .iter()
            .map(|system| SystemUser {
                system: system.clone(),
                user: user_of
                    .get(system.as_str())
                    .map_or(system.as_str(), |u| u)
                    .to_owned(),
            })
            .collect(),
        router_user: request.router_user.clone(),
        operator_user: request.operator_user.clone(),
    };
    let mut users: Vec<String> = spec.systems.iter().map(|s| s.user.clone()).collect();
    users.push(spec.router_user.clone());
    users.push(spec.operator_user.clone());
    let mut seen = std::collections::BTreeSet::new();
    for user in &users {
        anyhow::ensure!(
            seen.insert(user.as_str()),
            "broker user {user:?} would serve two roles (a system, the router or the operator)"
        );
    }
    let mut passwords = BTreeMap::new();
    let mut generated = BTreeMap::new();
    for user in users {
        let password = match std::env::var(password_variable(&user)) {
            Ok(p) if !p.is_empty() => p,
            _ => {
                let p = password::generate();
                generated.insert(user.clone(), p.clone());
                p
            }
        };
        passwords.insert(user, password);
    }
    let plan = config
        .topology()
        .plan(&systems)
        .context("the policy's systems do not make valid queue names")?;
    Ok(Output {
        definitions: spec.definitions(&plan, &passwords),
        generated,
    })
}

/// Loads `definitions` through the management API at `url`, as the administrator named by
/// `CONCORD_ADMIN_USER` / `CONCORD_ADMIN_PASSWORD` (default guest/guest).
pub(crate) fn load(url: &str, definitions: &Definitions) -> anyhow::Result<()> {
    let user = std::env::var("CONCORD_ADMIN_USER").unwrap_or_else(|_| "guest".to_owned());
    let password = std::env::var("CONCORD_ADMIN_PASSWORD").unwrap_or_else(|_| "guest".to_owned());
    let management = Management::new(url, &user, &password);
    for vhost in &definitions.vhosts {
        management
            .create_vhost(&vhost.name)
            .with_context(|| format!("creating vhost {:?} at {url}", vhost.name))?;
    }
    management
        .load_definitions(definitions)
        .with_context(|| format!("loading the definitions at {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_variables_and_vhosts() {
        assert_eq!(
            password_variable("orders"),
            "CONCORD_BROKER_PASSWORD_ORDERS"
        );
        assert_eq!(
            password_variable("it-x.router"),
            "CONCORD_BROKER_PASSWORD_IT_X_ROUTER"
        );
        assert_eq!(vhost_of("amqp://u:p@h:5672/%2f"), "/");
        assert_eq!(vhost_of("amqp://u:p@h:5672"), "/");
        assert_eq!(vhost_of("amqp://u:p@h:5672/"), "/");
        assert_eq!(vhost_of("amqps://h/concord?heartbeat=10"), "concord");
        assert_eq!(vhost_of("amqp://u:p@a:5681/v,amqp://u:p@b:5682/v"), "v");
    }
}
