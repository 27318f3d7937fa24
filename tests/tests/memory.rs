//! Memory stays bounded under hostile sizes: a router process flooded with inputs at its size
//! limit (each routed to two systems) keeps its peak resident memory under its configured
//! `memory_budget_mib` plus its own footprint, and an input one byte over the limit lands in the
//! router's dead-letter queue, whole, as `too_large`.

use std::time::Duration;

use anyhow::Context;
use concord_amqp::{MessageProps, Publisher, PublisherOptions, Topology};
use concord_it::*;
use concord_policy::clock::from_ms;
use concord_proto::v1::{ChangeEvent, FieldClock, Op};
use concord_router::{HEADER_REASON, RouterConfig};
use concord_seed_model::seed::v1::Customer;
use futures::StreamExt;
use prost::Message;

const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
const PREFETCH: u16 = 16;
const CONFIRM_WINDOW: usize = 32;
const BUDGET_MIB: u64 = 64;
/// What the router process uses besides the messages it holds (runtime, AMQP client, policy,
/// metrics), documented in the README next to `memory_budget_mib`.
const FOOTPRINT_MIB: u64 = 48;
const EVENTS: usize = 300;

/// A `kB` value of `/proc/<pid>/status`.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// An upsert of customer `key` by orders whose name fills the message up to `size` bytes.
fn event_of_size(key: &str, size: usize) -> Vec<u8> {
    let now = concord_amqp::now_ms();
    let mut ev = ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: "orders".into(),
        entity: "customer".into(),
        key: key.into(),
        op: Op::Upsert as i32,
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
    // Adjust the name until the whole message has exactly `size` bytes (length prefixes grow
    // with the name).
    let mut name_len = size.saturating_sub(ev.encoded_len() + 16);
    loop {
        ev.record = Customer {
            name: Some("x".repeat(name_len)),
            ..Default::default()
        }
        .encode_to_vec();
        let len = ev.encoded_len();
        match len.cmp(&size) {
            std::cmp::Ordering::Equal => return ev.encode_to_vec(),
            std::cmp::Ordering::Less => name_len += 1,
            std::cmp::Ordering::Greater => name_len -= 1,
        }
    }
}

#[tokio::test]
async fn a_router_flooded_with_messages_at_the_size_limit_stays_within_its_memory_budget()
-> anyhow::Result<()> {
    let env = Env::seed("memory")?;
    let ns = env.ns();
    let dir = tempfile::tempdir()?;
    let config = RouterConfig {
        prefetch: PREFETCH,
        confirm_window: CONFIRM_WINDOW,
        ack_batch: 8,
        max_message_bytes: MAX_MESSAGE_BYTES,
        memory_budget_mib: BUDGET_MIB,
        ..env.router_config()
    };
    config.validate("memory test")?;
    let config_path = dir.path().join("router.toml");
    std::fs::write(
        &config_path,
        env.router_toml(
            "127.0.0.1:0",
            &format!(
                "prefetch = {PREFETCH}\nconfirm_window = {CONFIRM_WINDOW}\nack_batch = 8\n\
             max_message_bytes = {MAX_MESSAGE_BYTES}\nmemory_budget_mib = {BUDGET_MIB}"
            ),
        ),
    )?;
    let router = RouterProcess::spawn(
        env!("CARGO_BIN_EXE_it-router"),
        &seed_policy(),
        &config_path,
    )?;
    let pid = router.0.id();
    let topo = Topology::new(ns);
    // Orders publishes; the operator watches the queues and reads the router's dead letters.
    let orders = concord_amqp::connect(&env.system_uri("orders"), "it-memory-orders").await?;
    let conn = concord_amqp::connect(&env.operator_uri(), "it-memory-operator").await?;
    let orders_user = env.vhost().system_user("orders");
    // The router declares its topology when it is up.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(ch) = conn.open_channel().await
                && concord_amqp::queue_message_count(&ch, &topo.inbox("support"))
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .context("the router did not declare its topology")?;

    let publisher = Publisher::open(&orders, PublisherOptions::default()).await?;
    let mut confirms = Vec::new();
    for i in 0..EVENTS {
        let body = event_of_size(&format!("c-{i}"), MAX_MESSAGE_BYTES);
        anyhow::ensure!(body.len() == MAX_MESSAGE_BYTES, "{} bytes", body.len());
        confirms.push(
            publisher
                .publish(
                    &topo.ingress_exchange(),
                    "orders.customer",
                    &body,
                    MessageProps::new().user_id(&orders_user),
                )
                .await?,
        );
    }
    // One byte over the limit.
    let oversized = event_of_size("c-big", MAX_MESSAGE_BYTES + 1);
    publisher
        .publish_confirmed(
            &topo.ingress_exchange(),
            "orders.customer",
            &oversized,
            MessageProps::new().user_id(&orders_user),
        )
        .await?;
    for c in confirms {
        c.await?;
    }
    // Every input routed: both subscribers' inboxes hold every copy.
    let ch = conn.open_channel().await?;
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let support = concord_amqp::queue_message_count(&ch, &topo.inbox("support")).await;
            let delivery = concord_amqp::queue_message_count(&ch, &topo.inbox("delivery")).await;
            if matches!((support, delivery), (Ok(s), Ok(d)) if s as usize >= EVENTS && d as usize >= EVENTS)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .context("the flood was not routed")?;
    let peak_mib = status_kib(pid, "VmHWM").context("the router's peak RSS")? / 1024;
    eprintln!(
        "router peak RSS {peak_mib} MiB after {EVENTS} inputs of {MAX_MESSAGE_BYTES} bytes \
         (prefetch {PREFETCH}, confirm window {CONFIRM_WINDOW}, budget {BUDGET_MIB} MiB)"
    );
    assert!(
        peak_mib <= BUDGET_MIB + FOOTPRINT_MIB,
        "peak RSS {peak_mib} MiB over the budget {BUDGET_MIB} MiB + footprint {FOOTPRINT_MIB} MiB"
    );

    // The oversized input is in the router's dead-letter queue, whole.
    let dlq_channel = conn.open_channel().await?;
    let mut dlq =
        concord_amqp::consume(&dlq_channel, &topo.router_dlq(), "it-memory-dlq", 1).await?;
    let d = tokio::time::timeout(Duration::from_secs(30), dlq.next())
        .await
        .context("no dead letter")?
        .context("the consumer ended")??;
    assert_eq!(d.header_str(HEADER_REASON), Some("too_large"));
    assert_eq!(d.body.len(), MAX_MESSAGE_BYTES + 1);
    assert_eq!(d.body, oversized);
    d.ack().await?;
    drop(router);
    Ok(())
}
