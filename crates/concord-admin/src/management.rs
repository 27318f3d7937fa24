//! A client of the RabbitMQ management HTTP API (plugin `rabbitmq_management`): loading
//! definitions, creating and deleting virtual hosts and users, reading the broker's state.

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A request the management API refused or that could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagementError {
    /// The API could not be reached, or its answer not read.
    #[error("management API {method} {path}: {source}")]
    Http {
        method: &'static str,
        path: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// The API answered with an error status.
    #[error("management API {method} {path}: HTTP {status}: {body}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
}

/// The management API of one broker, as one user.
#[derive(Debug, Clone)]
pub struct Management {
    base: String,
    authorization: String,
    agent: ureq::Agent,
}

/// Percent-encodes one path segment (a vhost or user name).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Management {
    /// The API at `base` (e.g. `http://127.0.0.1:15672`) with basic authentication.
    pub fn new(base: &str, user: &str, password: &str) -> Management {
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .into();
        Management {
            base: base.trim_end_matches('/').to_owned(),
            authorization: format!("Basic {credentials}"),
            agent,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/{path}", self.base)
    }

    fn check(
        method: &'static str,
        path: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>, ManagementError> {
        let mut response = result.map_err(|e| ManagementError::Http {
            method,
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(response);
        }
        let body = response
            .body_mut()
            .read_to_string()
            .unwrap_or_default()
            .chars()
            .take(1_000)
            .collect();
        Err(ManagementError::Status {
            method,
            path: path.to_owned(),
            status,
            body,
        })
    }

    /// `GET /api/{path}`, decoded from JSON.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ManagementError> {
        let r = self
            .agent
            .get(&self.url(path))
            .header("Authorization", &self.authorization)
            .call();
        let mut response = Self::check("GET", path, r)?;
        response
            .body_mut()
            .read_json()
            .map_err(|e| ManagementError::Http {
                method: "GET",
                path: path.to_owned(),
                source: Box::new(e),
            })
    }

    /// `PUT /api/{path}` with a JSON body.
    pub fn put<T: Serialize>(&self, path: &str, body: &T) -> Result<(), ManagementError> {
        let r = self
            .agent
            .put(&self.url(path))
            .header("Authorization", &self.authorization)
            .send_json(body);
        Self::check("PUT", path, r).map(drop)
    }

    /// `POST /api/{path}` with a JSON body.
    pub fn post<T: Serialize>(&self, path: &str, body: &T) -> Result<(), ManagementError> {
        let r = self
            .agent
            .post(&self.url(path))
            .header("Authorization", &self.authorization)
            .send_json(body);
        Self::check("POST", path, r).map(drop)
    }

    /// `DELETE /api/{path}`; a missing resource is not an error.
    pub fn delete(&self, path: &str) -> Result<(), ManagementError> {
        let r = self
            .agent
            .delete(&self.url(path))
            .header("Authorization", &self.authorization)
            .call();
        match Self::check("DELETE", path, r) {
            Ok(_) | Err(ManagementError::Status { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Loads definitions (users, vhosts, permissions, topology) into the broker. Upserts:
    /// existing users get the new password hash; nothing is deleted.
    pub fn load_definitions<T: Serialize>(&self, definitions: &T) -> Result<(), ManagementError> {
        self.post("definitions", definitions)
    }

    /// Creates virtual host `vhost` (no error if it exists).
    pub fn create_vhost(&self, vhost: &str) -> Result<(), ManagementError> {
        self.put(
            &format!("vhosts/{}", segment(vhost)),
            &serde_json::json!({}),
        )
    }

    /// Deletes virtual host `vhost` with everything in it (no error if it is missing).
    pub fn delete_vhost(&self, vhost: &str) -> Result<(), ManagementError> {
        self.delete(&format!("vhosts/{}", segment(vhost)))
    }

    /// `POST /api/{path}` with a JSON body, the answer decoded from JSON.
    pub fn post_for<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ManagementError> {
        let r = self
            .agent
            .post(&self.url(path))
            .header("Authorization", &self.authorization)
            .send_json(body);
        let mut response = Self::check("POST", path, r)?;
        response
            .body_mut()
            .read_json()
            .map_err(|e| ManagementError::Http {
                method: "POST",
                path: path.to_owned(),
                source: Box::new(e),
            })
    }

    /// The queues of `vhost` with their depths, consumers and rates.
    pub fn queues(&self, vhost: &str) -> Result<Vec<QueueInfo>, ManagementError> {
        self.get(&format!("queues/{}", segment(vhost)))
    }

    /// The consumers of `vhost` (which connection consumes which queue, and whether it is the
    /// single active one).
    pub fn consumers(&self, vhost: &str) -> Result<Vec<ConsumerInfo>, ManagementError> {
        self.get(&format!("consumers/{}", segment(vhost)))
    }

    /// The client connections to `vhost`.
    pub fn connections(&self, vhost: &str) -> Result<Vec<ConnectionInfo>, ManagementError> {
        self.get(&format!("vhosts/{}/connections", segment(vhost)))
    }

    /// Closes connection `name` (the broker tells the client `reason`); a connection already
    /// gone is not an error. Needs an administrator (or the connection's own user).
    pub fn close_connection(&self, name: &str, reason: &str) -> Result<(), ManagementError> {
        let path = format!("connections/{}", segment(name));
        let r = self
            .agent
            .delete(&self.url(&path))
            .header("Authorization", &self.authorization)
            .header("X-Reason", reason)
            .call();
        match Self::check("DELETE", &path, r) {
            Ok(_) | Err(ManagementError::Status { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The permissions of `user` in `vhost` (`None` if it has none there).
    pub fn permission(
        &self,
        vhost: &str,
        user: &str,
    ) -> Result<Option<PermissionInfo>, ManagementError> {
        match self.get(&format!("permissions/{}/{}", segment(vhost), segment(user))) {
            Ok(p) => Ok(Some(p)),
            Err(ManagementError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every user's permissions in `vhost`.
    pub fn permissions(&self, vhost: &str) -> Result<Vec<PermissionInfo>, ManagementError> {
        self.get(&format!("vhosts/{}/permissions", segment(vhost)))
    }

    /// Sets the permissions of `p.user` in `p.vhost`. Needs an administrator.
    pub fn set_permission(&self, p: &PermissionInfo) -> Result<(), ManagementError> {
        self.put(
            &format!("permissions/{}/{}", segment(&p.vhost), segment(&p.user)),
            &serde_json::json!({"configure": p.configure, "write": p.write, "read": p.read}),
        )
    }

    /// Reads up to `count` messages from the head of `queue` and puts them back
    /// (`ackmode = ack_requeue_true`: nothing is consumed; they are marked redelivered).
    pub fn peek(
        &self,
        vhost: &str,
        queue: &str,
        count: usize,
    ) -> Result<Vec<PeekedMessage>, ManagementError> {
        self.post_for(
            &format!("queues/{}/{}/get", segment(vhost), segment(queue)),
            &serde_json::json!({
                "count": count,
                "ackmode": "ack_requeue_true",
                "encoding": "base64",
            }),
        )
    }

    /// Deletes user `user` (no error if it is missing).
    pub fn delete_user(&self, user: &str) -> Result<(), ManagementError> {
        self.delete(&format!("users/{}", segment(user)))
    }
}

/// A queue as `GET /api/queues/{vhost}` describes it (the fields Concord reads).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct QueueInfo {
    pub name: String,
    pub messages_ready: u64,
    pub messages_unacknowledged: u64,
    pub consumers: u64,
    pub message_stats: Option<MessageStats>,
    /// The consumer tag of the single active consumer (queues with
    /// `x-single-active-consumer`).
    pub single_active_consumer_tag: Option<String>,
    /// The `timestamp` property (Unix seconds) of the message at the head of the queue, when
    /// it has one (classic queues only).
    pub head_message_timestamp: Option<u64>,
}

/// Message counters and rates of a queue (absent until something happened).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct MessageStats {
    pub publish_details: Option<Rate>,
    pub deliver_get_details: Option<Rate>,
}

/// A rate per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Rate {
    pub rate: f64,
}

/// A consumer as `GET /api/consumers/{vhost}` describes it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ConsumerInfo {
    pub consumer_tag: String,
    pub queue: NameRef,
    pub channel_details: ChannelDetails,
    /// `up`, `single_active` or `waiting`.
    pub activity_status: Option<String>,
    pub active: Option<bool>,
}

/// A named resource.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct NameRef {
    pub name: String,
}

/// The channel a consumer is on.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ChannelDetails {
    pub connection_name: String,
    pub user: String,
}

/// A client connection.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ConnectionInfo {
    pub name: String,
    pub user: String,
    pub vhost: String,
    pub client_properties: serde_json::Value,
}

/// One user's permissions in one vhost (regular expressions).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct PermissionInfo {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// A message read by [`Management::peek`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct PeekedMessage {
    pub routing_key: String,
    pub exchange: String,
    pub redelivered: bool,
    pub properties: PeekedProperties,
    /// The body, encoded as `payload_encoding` says (`base64` or `string`).
    pub payload: String,
    pub payload_encoding: String,
}

/// The AMQP properties of a peeked message.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct PeekedProperties {
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub user_id: Option<String>,
    pub message_id: Option<String>,
    pub timestamp: Option<u64>,
}

impl PeekedMessage {
    /// The body's bytes (`None` if the encoding is unknown or the base64 invalid).
    pub fn body(&self) -> Option<Vec<u8>> {
        match self.payload_encoding.as_str() {
            "base64" => base64::engine::general_purpose::STANDARD
                .decode(&self.payload)
                .ok(),
            "string" => Some(self.payload.clone().into_bytes()),
            _ => None,
        }
    }

    /// A string header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.properties.headers.get(name)?.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(segment("/"), "%2F");
        assert_eq!(segment("it-a.b_c~1"), "it-a.b_c~1");
        assert_eq!(segment("a b/ü"), "a%20b%2F%C3%BC");
    }

    #[test]
    fn api_answers_decode_with_missing_fields() {
        let q: Vec<QueueInfo> = serde_json::from_str(
            r#"[{"name":"n.inbox.a","messages_ready":3,"messages_unacknowledged":1,"consumers":1,
                "message_stats":{"publish_details":{"rate":2.5}},"other":1},
               {"name":"n.dlq.a"}]"#,
        )
        .unwrap();
        assert_eq!(q[0].messages_ready, 3);
        assert_eq!(
            q[0].message_stats.as_ref().unwrap().publish_details,
            Some(Rate { rate: 2.5 })
        );
        assert_eq!(q[1].consumers, 0);
        let m: PeekedMessage = serde_json::from_str(
            r#"{"payload":"aGk=","payload_encoding":"base64","routing_key":"a",
                "properties":{"headers":{"concord-reason":"apply_failed"},"timestamp":5}}"#,
        )
        .unwrap();
        assert_eq!(m.body().unwrap(), b"hi");
        assert_eq!(m.header("concord-reason"), Some("apply_failed"));
        assert_eq!(m.properties.timestamp, Some(5));
    }
}
