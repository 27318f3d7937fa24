//! Connecting (named connection, bounded retries), connection events and the
//! supervisor backoff.

use std::{
    fmt,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use backon::{ExponentialBuilder, Retryable};
use futures::{Stream, StreamExt};
use lapin::{ConnectionProperties, Event, uri::AMQPUri};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{channel::Channel, error::AmqpError};

/// How long [`Connection::close`] waits for the broker's answer.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Options for [`connect_with`]. `Default` gives sensible production values.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Heartbeat to request, in seconds (`None`: accept the broker's proposal, 60 s on
    /// RabbitMQ). The lower of client and broker values wins. Default: 30 s.
    pub heartbeat: Option<u16>,
    /// Timeout of one connection attempt (TCP + TLS + AMQP handshake). Default: 10 s.
    pub attempt_timeout: Duration,
    /// Maximum number of attempts, the first one included (at least 1). Default: 10.
    pub max_attempts: usize,
    /// Upper bound of the summed delays between attempts (`None`: only `max_attempts`
    /// bounds the retries). Default: 60 s.
    pub max_total_delay: Option<Duration>,
    /// First retry delay. Default: 100 ms.
    pub min_delay: Duration,
    /// Largest retry delay. Default: 5 s.
    pub max_delay: Duration,
    /// TLS settings for `amqps://` URIs (`None`: the platform's defaults, no client
    /// certificate).
    pub tls: Option<Tls>,
}

/// TLS settings of a connection, in PEM.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// Certificates of the authorities that sign the broker's certificate, trusted besides the
    /// built-in roots (a private CA).
    pub ca_pem: Option<String>,
    /// The client certificate (chain) and its private key, for brokers that verify clients.
    pub client: Option<ClientCertificate>,
}

/// A client certificate and its key, in PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientCertificate(..)")
    }
}

/// Where the TLS settings of a service are (`[tls]` in its config file): PEM files.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The authority that signs the broker's certificate (when not a public one).
    pub ca_file: Option<std::path::PathBuf>,
    /// This service's client certificate, for brokers that verify clients (with `key_file`).
    pub cert_file: Option<std::path::PathBuf>,
    /// The client certificate's private key (PKCS#8 or RSA, PEM).
    pub key_file: Option<std::path::PathBuf>,
}

impl TlsFiles {
    /// Reads the files; an error names the file and what is wrong.
    pub fn load(&self) -> Result<Tls, String> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("cannot read TLS file {}: {e}", p.display()))
        };
        let ca_pem = match &self.ca_file {
            Some(p) => Some(
                String::from_utf8(read(p)?)
                    .map_err(|_| format!("TLS file {} is not PEM text", p.display()))?,
            ),
            None => None,
        };
        let client = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(ClientCertificate {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
            }),
            (None, None) => None,
            _ => return Err("tls: set both cert_file and key_file, or neither".to_owned()),
        };
        Ok(Tls { ca_pem, client })
    }
}

impl Tls {
    fn lapin(&self) -> lapin::tcp::OwnedTLSConfig {
        lapin::tcp::OwnedTLSConfig {
            identity: self
                .client
                .as_ref()
                .map(|c| lapin::tcp::OwnedIdentity::PKCS8 {
                    pem: c.cert_pem.clone(),
                    key: c.key_pem.clone(),
                }),
            cert_chain: self.ca_pem.clone(),
        }
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            heartbeat: Some(30),
            attempt_timeout: Duration::from_secs(10),
            max_attempts: 10,
            max_total_delay: Some(Duration::from_secs(60)),
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            tls: None,
        }
    }
}

impl ConnectOptions {
    fn retry_policy(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_jitter()
            .with_max_times(self.max_attempts.max(1) - 1)
            .with_total_delay(self.max_total_delay)
    }
}

/// The backoff supervisors use between reconnection rounds: 100 ms doubling up to 10 s,
/// with jitter, never giving up.
///
/// ```no_run
/// # async fn run() {}
/// # async fn supervise() {
/// use concord_amqp::{BackoffBuilder, backoff};
/// let mut delays = backoff().build();
/// loop {
///     // connect, declare, run until error...
///     run().await;
///     let delay = delays.next().unwrap_or(std::time::Duration::from_secs(10));
///     tokio::time::sleep(delay).await;
///     // (rebuild `delays` after a run that lasted long enough to count as healthy)
/// }
/// # }
/// ```
#[must_use]
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
}

/// `"{role}@{hostname}"`, the connection name Concord services use. The hostname is
/// the `HOSTNAME` environment variable if set, else `/etc/hostname`, else `localhost`.
#[must_use]
pub fn connection_name(role: &str) -> String {
    format!("{role}@{}", hostname())
}

fn hostname() -> String {
    let non_empty = |s: String| {
        let s = s.trim().to_owned();
        (!s.is_empty()).then_some(s)
    };
    std::env::var("HOSTNAME")
        .ok()
        .and_then(non_empty)
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .and_then(non_empty)
        })
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The URIs of a broker setting: one AMQP URI, or several separated by commas (the nodes of a
/// cluster, e.g. `amqp://u:p@rabbit-0:5672/v,amqp://u:p@rabbit-1:5672/v`), in the order given.
/// A comma starts a new URI only where `amqp://` or `amqps://` follows it, so a password may
/// contain commas; whitespace around the URIs is ignored.
#[must_use]
pub fn split_uris(uris: &str) -> Vec<&str> {
    let starts_uri = |rest: &str| {
        let rest = rest.trim_start().as_bytes();
        [b"amqp://".as_slice(), b"amqps://".as_slice()]
            .iter()
            .any(|scheme| {
                rest.len() >= scheme.len() && rest[..scheme.len()].eq_ignore_ascii_case(scheme)
            })
    };
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in uris.match_indices(',') {
        if starts_uri(&uris[i + 1..]) {
            out.push(uris[start..i].trim());
            start = i + 1;
        }
    }
    out.push(uris[start..].trim());
    out
}

/// Parses the URIs of [`split_uris`]: every one must be valid, and all must log in as the same
/// user to the same vhost (they name the nodes of one broker, and the user is the identity the
/// broker validates `user_id` against).
fn parse_uris(uris: &str) -> Result<Vec<AMQPUri>, AmqpError> {
    let parsed = split_uris(uris)
        .into_iter()
        .map(|uri| uri.parse::<AMQPUri>().map_err(AmqpError::InvalidUri))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(first) = parsed.first() {
        let same = |u: &AMQPUri| {
            u.authority.userinfo.username == first.authority.userinfo.username
                && u.vhost == first.vhost
        };
        if !parsed.iter().all(same) {
            return Err(AmqpError::InvalidUri(
                "the URIs of a list must name the same user and vhost (the nodes of one broker)"
                    .to_owned(),
            ));
        }
    }
    Ok(parsed)
}

/// The user an AMQP URI (or a list of them, see [`split_uris`]) logs in as (`guest` when the URI
/// names none): the identity the broker validates `user_id` against.
pub fn login_of(uri: &str) -> Result<String, AmqpError> {
    let parsed = parse_uris(uri)?;
    Ok(parsed
        .into_iter()
        .next()
        .map(|u| u.authority.userinfo.username)
        .unwrap_or_default())
}

/// Connect with [`ConnectOptions::default`]. See [`connect_with`].
pub async fn connect(uri: &str, connection_name: &str) -> Result<Connection, AmqpError> {
    connect_with(uri, connection_name, &ConnectOptions::default()).await
}

/// Open a connection named `connection_name` (the `connection_name` client property,
/// shown in the management UI), retrying failed attempts with exponential backoff
/// within the bounds of `options`. Bad credentials or an unknown vhost fail at once.
///
/// `uri` may list the nodes of a cluster ([`split_uris`]): one attempt tries them in the order
/// given and takes the first that accepts the connection, so that a node that is down costs a
/// refused connection, not a retry delay; the delay comes between rounds over all nodes.
///
/// lapin's automatic recovery is deliberately NOT enabled: after the connection is up,
/// failures surface as errors and the caller's supervisor reconnects (and, with a list,
/// reaches whichever node is up).
pub async fn connect_with(
    uri: &str,
    connection_name: &str,
    options: &ConnectOptions,
) -> Result<Connection, AmqpError> {
    let mut nodes = parse_uris(uri)?;
    for parsed in &mut nodes {
        if let Some(heartbeat) = options.heartbeat {
            parsed.query.heartbeat = Some(heartbeat);
        }
    }
    let endpoints: Vec<String> = nodes
        .iter()
        .map(|parsed| {
            format!(
                "{}:{}/{}",
                parsed.authority.host, parsed.authority.port, parsed.vhost
            )
        })
        .collect();
    let endpoint = endpoints.join(", ");
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    let attempts = AtomicUsize::new(0);
    let attempt_timeout = options.attempt_timeout;

    let tls = options.tls.as_ref().map(Tls::lapin).unwrap_or_default();
    let connect_node = |parsed: AMQPUri| {
        let properties = properties.clone();
        let tls = tls.clone();
        async move {
            let runtime = lapin::runtime::default_runtime().map_err(AmqpError::from)?;
            match tokio::time::timeout(
                attempt_timeout,
                lapin::Connection::connect_uri_with_config(parsed, properties, tls, runtime),
            )
            .await
            {
                Ok(Ok(connection)) => Ok(connection),
                Ok(Err(e)) => Err(AmqpError::from(e)),
                Err(_) => Err(AmqpError::Timeout(attempt_timeout)),
            }
        }
    };
    let attempt = || async {
        attempts.fetch_add(1, Ordering::Relaxed);
        let mut last = AmqpError::InvalidUri("no URI".to_owned());
        for (parsed, node) in nodes.iter().zip(&endpoints) {
            match connect_node(parsed.clone()).await {
                Ok(connection) => return Ok((connection, node)),
                Err(e) if e.is_permanent_connect_error() => return Err(e),
                Err(e) => {
                    if nodes.len() > 1 {
                        warn!(endpoint = %node, error = %e, "AMQP node unreachable, trying the next");
                    }
                    last = e;
                }
            }
        }
        Err(last)
    };
    let result = attempt
        .retry(options.retry_policy())
        .sleep(tokio::time::sleep)
        .when(|e: &AmqpError| !e.is_permanent_connect_error())
        .notify(|e: &AmqpError, delay: Duration| {
            warn!(%endpoint, error = %e, ?delay, "AMQP connect failed, retrying");
        })
        .await;
    match result {
        Ok((inner, node)) => {
            info!(endpoint = %node, connection_name, "AMQP connected");
            Ok(Connection {
                inner,
                name: connection_name.to_owned(),
            })
        }
        Err(source) => Err(AmqpError::Connect {
            endpoint,
            attempts: attempts.load(Ordering::Relaxed),
            source: Box::new(source),
        }),
    }
}

/// A broker connection (one lapin I/O thread). Cheap operations only; open channels with
/// [`Connection::open_channel`].
pub struct Connection {
    inner: lapin::Connection,
    name: String,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("name", &self.name)
            .field("connected", &self.is_connected())
            .field("blocked", &self.is_blocked())
            .finish()
    }
}

/// A connection-level event (see [`Connection::events`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// The connection is established.
    Connected,
    /// The broker blocked publishing on this connection (memory or disk alarm).
    Blocked {
        /// The broker's reason, e.g. `"low on memory"`.
        reason: String,
    },
    /// The broker lifted the block.
    Unblocked,
    /// The connection or a channel failed.
    Error(AmqpError),
    /// Any other lapin event (flow control, ...).
    Other,
}

impl ConnectionEvent {
    fn from_lapin(event: Event) -> Self {
        match event {
            Event::Connected => ConnectionEvent::Connected,
            Event::ConnectionBlocked(reason) => ConnectionEvent::Blocked { reason },
            Event::ConnectionUnblocked => ConnectionEvent::Unblocked,
            Event::Error(e) => ConnectionEvent::Error(e.into()),
            _ => ConnectionEvent::Other,
        }
    }
}

impl Connection {
    /// The client-provided connection name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Open a new channel.
    pub async fn open_channel(&self) -> Result<Channel, AmqpError> {
        Ok(Channel::new(self.inner.create_channel().await?))
    }

    /// Whether the connection is currently usable.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.inner.status().connected()
    }

    /// Whether the broker currently blocks publishing on this connection (resource alarm).
    #[must_use]
    pub fn is_blocked(&self) -> bool {
        self.inner.status().blocked()
    }

    /// Stream of connection events (blocked / unblocked / errors). Only events emitted
    /// after this call are seen.
    pub fn events(&self) -> impl Stream<Item = ConnectionEvent> + Send + 'static {
        self.inner
            .events_listener()
            .map(ConnectionEvent::from_lapin)
    }

    /// A watch of the broker's publishing block: `Some(reason)` while blocked by a
    /// resource alarm, `None` otherwise. A background task follows the connection's
    /// events until the connection goes away or every receiver is dropped. Publishers
    /// use it to report "blocked by broker alarm" instead of looking stuck.
    pub fn watch_blocked(&self) -> Result<watch::Receiver<Option<String>>, AmqpError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| AmqpError::NoRuntime)?;
        // Subscribe before reading the current state so no transition is missed.
        let mut events = Box::pin(self.inner.events_listener());
        let initial = self
            .is_blocked()
            .then(|| "blocked before watch started".to_owned());
        let (tx, rx) = watch::channel(initial);
        let name = self.name.clone();
        runtime.spawn(async move {
            loop {
                tokio::select! {
                    () = tx.closed() => break,
                    event = events.next() => match event {
                        None => break,
                        Some(Event::ConnectionBlocked(reason)) => {
                            warn!(connection = %name, %reason, "broker blocked publishing");
                            tx.send_replace(Some(reason));
                        }
                        Some(Event::ConnectionUnblocked) => {
                            info!(connection = %name, "broker unblocked publishing");
                            tx.send_replace(None);
                        }
                        Some(other) => debug!(connection = %name, event = ?other, "connection event"),
                    },
                }
            }
        });
        Ok(rx)
    }

    /// Close the connection gracefully (200 OK). Closing an already closed connection is
    /// not an error. Gives up after [`CLOSE_TIMEOUT`] ([`AmqpError::Timeout`]): a connection
    /// whose socket was just reset may never answer (seen after a cluster node was killed).
    pub async fn close(&self) -> Result<(), AmqpError> {
        if !self.is_connected() {
            return Ok(());
        }
        match tokio::time::timeout(CLOSE_TIMEOUT, self.inner.close(200, "OK".into())).await {
            Err(_) => Err(AmqpError::Timeout(CLOSE_TIMEOUT)),
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) if !self.is_connected() => Ok(()),
            Ok(Err(e)) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn connection_name_is_role_at_host() {
        let name = connection_name("router");
        let (role, host) = name.split_once('@').unwrap();
        assert_eq!(role, "router");
        assert!(!host.is_empty());
        assert!(!host.contains('\n'));
    }

    #[test]
    fn supervisor_backoff_never_gives_up_and_is_capped() {
        let delays: Vec<Duration> = backoff().build().take(100).collect();
        assert_eq!(delays.len(), 100);
        // jitter adds at most one extra min_delay-sized share on top of the cap
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(20)));
        assert!(delays[0] >= Duration::from_millis(100));
    }

    #[test]
    fn connect_policy_is_bounded() {
        let options = ConnectOptions {
            max_attempts: 3,
            max_total_delay: None,
            ..ConnectOptions::default()
        };
        assert_eq!(options.retry_policy().build().count(), 2);
        let zero = ConnectOptions {
            max_attempts: 0,
            ..ConnectOptions::default()
        };
        assert_eq!(zero.retry_policy().build().count(), 0);
    }

    #[test]
    fn a_uri_setting_may_list_the_nodes_of_a_cluster() {
        assert_eq!(split_uris("amqp://u:p@h:5672/v"), ["amqp://u:p@h:5672/v"]);
        assert_eq!(
            split_uris("amqp://u:p@a:5672/v, AMQPS://u:p@b:5671/v ,amqp://u:p@c/v"),
            [
                "amqp://u:p@a:5672/v",
                "AMQPS://u:p@b:5671/v",
                "amqp://u:p@c/v"
            ]
        );
        // A comma not followed by a scheme belongs to the URI (a password may hold one).
        assert_eq!(
            split_uris("amqp://u:p,w@a/v,amqp://u:p,w@b/v"),
            ["amqp://u:p,w@a/v", "amqp://u:p,w@b/v"]
        );
        assert_eq!(
            login_of("amqp://orders:x@a:5681/v,amqp://orders:x@b:5682/v").unwrap(),
            "orders"
        );
        assert_eq!(login_of("amqp://a:5681/v").unwrap(), "guest");
        // The nodes of one broker: one user, one vhost.
        assert!(login_of("amqp://orders:x@a/v,amqp://support:x@b/v").is_err());
        assert!(login_of("amqp://orders:x@a/v,amqp://orders:x@b/w").is_err());
    }

    #[test]
    fn blocked_events_are_mapped() {
        assert!(matches!(
            ConnectionEvent::from_lapin(Event::ConnectionBlocked("low on memory".into())),
            ConnectionEvent::Blocked { reason } if reason == "low on memory"
        ));
        assert!(matches!(
            ConnectionEvent::from_lapin(Event::ConnectionUnblocked),
            ConnectionEvent::Unblocked
        ));
    }
}
