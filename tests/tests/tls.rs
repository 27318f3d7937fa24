//! TLS: the router and an adapter connect to a broker node that accepts only TLS clients with a
//! certificate (a node of its own, started by this test with `tests/scripts/rabbit-node.sh`:
//! its own CA, server and client certificates), and a change is routed and applied through it.
//! A client without a certificate, or that does not trust the broker's CA, is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use concord_adapter::RunnerConfig;
use concord_adapter::testkit::MemorySystem;
use concord_amqp::{ConnectOptions, MessageProps, Publisher, PublisherOptions, TlsFiles};
use concord_policy::clock::from_ms;
use concord_proto::v1::{ChangeEvent, FieldClock, Op};
use concord_router::{Router, RouterConfig};
use concord_seed_model::seed::v1::Customer;
use prost::Message;

const NODE: &str = "concord-tls-test";
const AMQP_PORT: u16 = 5673;
const DIST_PORT: u16 = 25673;
const TLS_PORT: u16 = 5674;

/// The test's broker node; stopped (and its directory removed) when dropped.
struct TlsNode {
    dir: PathBuf,
}

impl TlsNode {
    fn start() -> anyhow::Result<TlsNode> {
        let dir = std::env::temp_dir().join(format!("concord-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let node = TlsNode { dir };
        let status = std::process::Command::new(script())
            .arg("start")
            .arg(&node.dir)
            .arg(NODE)
            .args([AMQP_PORT, DIST_PORT, TLS_PORT].map(|p| p.to_string()))
            .status()
            .context("running rabbit-node.sh")?;
        anyhow::ensure!(status.success(), "the TLS node did not start");
        Ok(node)
    }

    fn files(&self, client_certificate: bool) -> TlsFiles {
        TlsFiles {
            ca_file: Some(self.dir.join("ca.pem")),
            cert_file: client_certificate.then(|| self.dir.join("client.pem")),
            key_file: client_certificate.then(|| self.dir.join("client.key")),
        }
    }
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        let _ = std::process::Command::new(script())
            .arg("stop")
            .arg(&self.dir)
            .arg(NODE)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbit-node.sh")
}

const URI: &str = "amqps://guest:guest@localhost:5674/%2f";

#[tokio::test]
async fn router_and_adapters_sync_over_tls_with_client_certificates() -> anyhow::Result<()> {
    let node = TlsNode::start()?;
    let namespace = concord_it::unique_namespace("tls");
    let dir = tempfile::tempdir()?;

    // A client must present a certificate, and must trust the broker's CA.
    let connect = |files: Option<TlsFiles>| async move {
        let tls = match files {
            Some(f) => Some(f.load().map_err(anyhow::Error::msg)?),
            None => None,
        };
        let options = ConnectOptions {
            tls,
            max_attempts: 1,
            ..ConnectOptions::default()
        };
        Ok::<_, anyhow::Error>(concord_amqp::connect_with(URI, "tls-probe", &options).await?)
    };
    assert!(
        connect(Some(node.files(false))).await.is_err(),
        "no client certificate"
    );
    assert!(
        connect(None).await.is_err(),
        "the private CA is not trusted by default"
    );
    let publisher_conn = connect(Some(node.files(true))).await?;

    // Everything on this node runs as guest: the events it publishes are orders'.
    let router = Router::start(
        RouterConfig {
            amqp_uri: URI.to_owned(),
            namespace: namespace.clone(),
            http_listen: "127.0.0.1:0".to_owned(),
            watch_policy: false,
            tls: Some(node.files(true)),
            users: [("guest".to_owned(), "orders".to_owned())].into(),
            ..RouterConfig::default()
        },
        concord_it::seed_policy(),
    )
    .await?;
    tokio::time::timeout(Duration::from_secs(30), router.wait_ready())
        .await
        .context("the router did not connect over TLS")??;
    let support = MemorySystem::new("support");
    let mut config = RunnerConfig::new(
        "support",
        URI,
        dir.path().join("support.sqlite"),
        concord_it::seed_policy(),
    );
    config.namespace = namespace.clone();
    config.router_user = "guest".to_owned();
    config.tls = Some(node.files(true));
    let mut runner = concord_adapter::start(support.clone(), config);
    tokio::time::timeout(Duration::from_secs(30), runner.wait_ready())
        .await
        .context("the adapter did not connect over TLS")??;

    let now = concord_amqp::now_ms();
    let ev = ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: "orders".into(),
        entity: "customer".into(),
        key: "c-tls".into(),
        op: Op::Upsert as i32,
        record: Customer {
            name: Some("Ada over TLS".into()),
            ..Default::default()
        }
        .encode_to_vec(),
        field_mask: vec!["name".into()],
        clocks: [(
            "name".to_owned(),
            FieldClock {
                hlc: from_ms(now),
                system: "orders".into(),
                rank: 0,
            },
        )]
        .into(),
        schema_version: concord_proto::SCHEMA_VERSION,
        observed_at_ms: now,
        ..Default::default()
    };
    let publisher = Publisher::open(&publisher_conn, PublisherOptions::default()).await?;
    publisher
        .publish_confirmed(
            &format!("{namespace}.ingress"),
            "orders.customer",
            &ev.encode_to_vec(),
            MessageProps::new().user_id("guest"),
        )
        .await?;
    tokio::time::timeout(
        Duration::from_secs(30),
        runner.wait_until(|m| m.incoming_applied >= 1),
    )
    .await
    .context("the change did not arrive over TLS")?;
    assert!(support.find("customer", "name", "Ada over TLS").is_some());

    runner.shutdown().await?;
    router.shutdown().await?;
    let _ = publisher_conn.close().await;
    drop(node);
    Ok(())
}
