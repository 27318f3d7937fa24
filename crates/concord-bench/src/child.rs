//! The measured processes: the router and the baseline forwarder each run as a child process
//! (this binary re-executed with a hidden `--role`), so that their CPU time and memory are
//! measured apart from the load generator.
//!
//! Protocol: the child prints `READY` on stdout once it consumes; it drains and exits when its
//! stdin closes (or on SIGTERM / SIGINT). The parent kills it if it is dropped.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::task::JoinHandle;

use crate::procfs;

/// How long a child may take to connect and start consuming.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to drain and exit once asked to.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval of the RSS sampler.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Which program a child runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// `concord router`: `concord_router::Router`, run until signalled.
    Router,
    /// The plain AMQP forwarder (the baseline).
    Forwarder,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Router => "router",
            Role::Forwarder => "forwarder",
        }
    }
}

/// A running child.
#[derive(Debug)]
pub struct ChildProc {
    role: Role,
    pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    peak_rss_kib: Arc<AtomicU64>,
    sampler: JoinHandle<()>,
}

impl ChildProc {
    /// Starts this binary with `--role role` and `args`, and waits until it is ready.
    pub async fn spawn(role: Role, args: &[String]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the concord-bench binary")?;
        let mut child = Command::new(exe)
            .arg("--role")
            .arg(role.as_str())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {} child", role.as_str()))?;
        let pid = child
            .id()
            .with_context(|| format!("the {} child exited at once", role.as_str()))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .context("the child's stdout is not piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if line.trim() == "READY" {
                    return Ok(true);
                }
            }
            Ok::<_, std::io::Error>(false)
        })
        .await;
        match ready {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                let status = child.wait().await.ok();
                bail!(
                    "the {} child exited before it was ready ({status:?})",
                    role.as_str()
                );
            }
            Ok(Err(e)) => return Err(e).context("reading the child's stdout"),
            Err(_) => bail!(
                "the {} child was not ready within {READY_TIMEOUT:?}",
                role.as_str()
            ),
        }
        // Keep reading so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let peak_rss_kib = Arc::new(AtomicU64::new(0));
        let peak = peak_rss_kib.clone();
        let sampler = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match procfs::status_kib(pid, "VmRSS") {
                    Some(rss) => {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    None => break,
                }
            }
        });
        Ok(Self {
            role,
            pid,
            child,
            stdin,
            peak_rss_kib,
            sampler,
        })
    }

    /// CPU time the child used so far.
    pub fn cpu(&self) -> Duration {
        procfs::cpu_time(self.pid).unwrap_or_default()
    }

    /// Peak resident memory so far: the larger of the sampled `VmRSS` maxima and `VmHWM`.
    pub fn peak_rss_kib(&self) -> u64 {
        let hwm = procfs::status_kib(self.pid, "VmHWM").unwrap_or(0);
        self.peak_rss_kib.load(Ordering::Relaxed).max(hwm)
    }

    /// Asks the child to drain and exit (closes its stdin) and waits for it; kills it if it
    /// does not exit in time.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.sampler.abort();
        drop(self.stdin.take());
        match tokio::time::timeout(EXIT_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!("the {} child failed: {status}", self.role.as_str()),
            Ok(Err(e)) => Err(e).context("waiting for the child"),
            Err(_) => {
                let _ = self.child.kill().await;
                bail!(
                    "the {} child did not exit within {EXIT_TIMEOUT:?}; killed",
                    self.role.as_str()
                )
            }
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}
