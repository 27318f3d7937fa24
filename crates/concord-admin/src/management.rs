//! A client of the RabbitMQ management HTTP API (plugin `rabbitmq_management`): loading
//! definitions, creating and deleting virtual hosts and users, reading the broker's state.

use base64::Engine as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

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

    /// Deletes user `user` (no error if it is missing).
    pub fn delete_user(&self, user: &str) -> Result<(), ManagementError> {
        self.delete(&format!("users/{}", segment(user)))
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
}
