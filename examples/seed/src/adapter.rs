//! The `concord-sql` adapter processes of the demo.
//!
//! The demo runs each adapter as a process of its own, and that process is the demo's own
//! executable re-run as `concord-seed-demo adapter --config FILE`, which runs
//! [`concord_adapter::process::run_process`] with [`concord_sql::SqlSystem`]: the code of
//! `concord-sql run`, whose `main` is `concord_adapter::main_with::<SqlSystem>`. Re-running
//! itself means `cargo run -p concord-seed-demo` builds everything the demo runs (a binary of
//! another package would have to be built by a second command, or be stale).
//!
//! An adapter process stops, draining like `concord-sql run` on SIGTERM or Ctrl-C, also when
//! its standard input closes: the demo stops it that way, and if the demo dies, its adapters
//! do not outlive it.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use concord_adapter::process::LogFormat;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

/// The child's side: runs the adapter of `config` until a signal or the end of stdin.
pub fn main(config: PathBuf) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args = concord_adapter::Args {
        config,
        amqp_uri: std::env::var("CONCORD_AMQP_URI").ok(),
        log_format: LogFormat::Human,
        check: false,
    };
    let result = runtime.block_on(concord_adapter::process::run_process::<
        concord_sql::SqlSystem,
    >(args, stopped()));
    // The thread reading stdin may still block: do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C, SIGTERM or the end of stdin.
async fn stopped() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
        _ = rx => {}
    }
}

/// The demo's side: one adapter process.
#[derive(Debug)]
pub struct Process {
    pub system: &'static str,
    pub http: SocketAddr,
    child: Child,
}

impl Process {
    /// Starts `concord-seed-demo adapter --config config` with `env` added to its environment
    /// (the broker URI, the database URL); its endpoints listen on `http`.
    pub fn spawn(
        system: &'static str,
        config: &Path,
        http: SocketAddr,
        env: &[(String, String)],
    ) -> anyhow::Result<Process> {
        let exe = std::env::current_exe().context("the demo's executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg("adapter")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the {system} adapter"))?;
        Ok(Process {
            system,
            http,
            child,
        })
    }

    /// Waits until the adapter reports ready (`/readyz`), or fails if it exits first.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the {} adapter exited: {status}", self.system);
            }
            if ready(self.http).await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the {} adapter is not ready after 60 s", self.system);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails if the adapter exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("the {} adapter exited: {status}", self.system),
            None => Ok(()),
        }
    }

    /// Stops the adapter: closes its stdin (it drains and exits), kills it after 15 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                // Ctrl-C reaches the adapters too: a drained stop either way.
                if !status.success() {
                    bail!("the {} adapter exited: {status}", self.system);
                }
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("the {} adapter did not stop in 15 s: killed", self.system);
            }
        }
        Ok(())
    }
}

/// Whether `GET /readyz` answers 200.
async fn ready(addr: SocketAddr) -> bool {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        Ok::<bool, std::io::Error>(head.ends_with(b" 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(true))
    )
}

/// A free local port for an adapter's endpoints.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?)
}
