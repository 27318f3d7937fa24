//! A small TCP proxy for fault injection: clients connect to [`Proxy::addr`], every connection
//! is forwarded to the target (the broker) byte for byte, and the test can cut every current
//! connection abruptly ([`Proxy::cut`]: a TCP reset to both sides, as a crashed peer or a
//! middlebox dropping the flow would look), refuse new ones for a while ([`Proxy::pause`]), or
//! hold back everything the target sends to the clients ([`Proxy::hold_replies`]: requests still
//! reach the broker, its replies and confirms do not reach the client).
//!
//! The proxy stops (and resets whatever it still forwards) when dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;

/// One forwarded connection: how to cut it, and its task.
#[derive(Debug)]
struct Link {
    cut: oneshot::Sender<()>,
    task: JoinHandle<()>,
    /// The local port of the proxy's connection to the target (the broker sees it as the
    /// client's port).
    upstream_port: u16,
}

#[derive(Debug, Default)]
struct State {
    links: HashMap<u64, Link>,
    next_id: u64,
}

#[derive(Debug)]
struct Inner {
    target: SocketAddr,
    state: Mutex<State>,
    paused: AtomicBool,
    /// While true, nothing is copied from the target to the clients.
    hold: watch::Sender<bool>,
    /// Connections accepted and forwarded to the target.
    forwarded: AtomicU64,
    /// Connections refused while paused (or because the target could not be reached).
    refused: AtomicU64,
    /// Woken whenever a counter changes.
    changed: Notify,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running proxy (see the module docs).
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            target,
            state: Mutex::new(State::default()),
            paused: AtomicBool::new(false),
            hold: watch::Sender::new(false),
            forwarded: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            changed: Notify::new(),
        });
        let accept = tokio::spawn(accept_loop(listener, inner.clone()));
        Ok(Proxy {
            addr,
            inner,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Aborts every current connection with a TCP reset on both sides (`SO_LINGER` 0), and
    /// returns once they are all closed. Returns how many there were.
    pub async fn cut(&self) -> usize {
        let links: Vec<Link> = self.inner.state().links.drain().map(|(_, l)| l).collect();
        let n = links.len();
        for link in links {
            // A task that already ended dropped its receiver: nothing to cut.
            let _ = link.cut.send(());
            let _ = link.task.await;
        }
        self.inner.changed.notify_waiters();
        n
    }

    /// Refuses new connections (accepted, then reset at once) until [`Proxy::resume`].
    /// Current connections are not touched.
    pub fn pause(&self) {
        self.inner.paused.store(true, Ordering::SeqCst);
    }

    /// Forwards new connections again.
    pub fn resume(&self) {
        self.inner.paused.store(false, Ordering::SeqCst);
    }

    /// Stops copying what the target sends to the clients (their requests still go through),
    /// on current and new connections, until [`Proxy::release_replies`].
    pub fn hold_replies(&self) {
        self.inner.hold.send_replace(true);
    }

    /// Copies what the target sends to the clients again (what was held back first).
    pub fn release_replies(&self) {
        self.inner.hold.send_replace(false);
    }

    /// Connections accepted and forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.inner.forwarded.load(Ordering::SeqCst)
    }

    /// Connections refused so far (while paused, or when the target was unreachable).
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::SeqCst)
    }

    /// Connections being forwarded right now.
    pub fn open(&self) -> usize {
        self.inner.state().links.len()
    }

    /// The local ports of the proxy's current connections to the target, i.e. the client
    /// ports the broker sees (`rabbitmqctl list_connections peer_port`).
    pub fn upstream_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .inner
            .state()
            .links
            .values()
            .map(|l| l.upstream_port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// Waits until at least `n` connections have been forwarded in total.
    pub async fn wait_forwarded(&self, n: u64) {
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.forwarded() >= n {
                return;
            }
            changed.await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for (_, link) in self.inner.state().links.drain() {
            let _ = link.cut.send(());
        }
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if inner.paused.load(Ordering::SeqCst) {
            reset(&client);
            drop(client);
            inner.refused.fetch_add(1, Ordering::SeqCst);
            inner.changed.notify_waiters();
            continue;
        }
        let upstream = match TcpStream::connect(inner.target).await {
            Ok(s) => s,
            Err(_) => {
                reset(&client);
                drop(client);
                inner.refused.fetch_add(1, Ordering::SeqCst);
                inner.changed.notify_waiters();
                continue;
            }
        };
        let upstream_port = upstream.local_addr().map_or(0, |a| a.port());
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (cut_tx, cut_rx) = oneshot::channel();
        let mut state = inner.state();
        let id = state.next_id;
        state.next_id += 1;
        let task = tokio::spawn(forward(client, upstream, cut_rx, inner.clone(), id));
        state.links.insert(
            id,
            Link {
                cut: cut_tx,
                task,
                upstream_port,
            },
        );
        drop(state);
        inner.forwarded.fetch_add(1, Ordering::SeqCst);
        inner.changed.notify_waiters();
    }
}

/// Copies both ways until either side closes, or until cut (then resets both sides).
async fn forward(
    mut client: TcpStream,
    mut upstream: TcpStream,
    cut: oneshot::Receiver<()>,
    inner: Arc<Inner>,
    id: u64,
) {
    let hold = inner.hold.subscribe();
    tokio::select! {
        _ = copy_both_ways(&mut client, &mut upstream, hold) => {}
        // An error means the sender was dropped without cutting: the proxy is stopping.
        _ = cut => {
            reset(&client);
            reset(&upstream);
        }
    }
    drop(client);
    drop(upstream);
    inner.state().links.remove(&id);
    inner.changed.notify_waiters();
}

/// `copy_bidirectional`, except that the target-to-client direction pauses while `hold` is set.
async fn copy_both_ways(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mut hold: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (mut client_rx, mut client_tx) = client.split();
    let (mut upstream_rx, mut upstream_tx) = upstream.split();
    let requests = async {
        tokio::io::copy(&mut client_rx, &mut upstream_tx).await?;
        upstream_tx.shutdown().await
    };
    let replies = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = upstream_rx.read(&mut buf).await?;
            if n == 0 {
                return client_tx.shutdown().await;
            }
            // Whatever arrives while held waits here (and, once this buffer is taken, in the
            // sockets' buffers) until released.
            if hold.wait_for(|h| !*h).await.is_err() {
                return Ok(());
            }
            client_tx.write_all(&buf[..n]).await?;
        }
    };
    tokio::try_join!(requests, replies).map(drop)
}

/// Makes the coming close of `s` send a TCP reset instead of a graceful FIN.
fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}
