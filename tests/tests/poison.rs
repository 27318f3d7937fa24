//! Poison messages go to the router's dead-letter queue with their reason, and routing goes on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::Context;
use concord_adapter::testkit::text;
use concord_amqp::{MessageProps, Publisher, PublisherOptions, Topology};
use concord_it::*;
use futures::StreamExt;
use prost::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_their_reason() -> anyhow::Result<()> {
    let run = SeedRun::start("poison").await?;
    let (env, nodes) = (&run.env, &run.nodes);
    let [_, orders, support] = [&nodes[0], &nodes[1], &nodes[2]];
    let topo = Topology::new(env.ns());

    // Each case is published by the system whose routing key it carries, as its broker user.
    let mut publishers = std::collections::BTreeMap::new();
    for system in ["orders", "support"] {
        let conn = concord_amqp::connect(&env.system_uri(system), "it-poison").await?;
        let publisher = Publisher::open(&conn, PublisherOptions::default()).await?;
        publishers.insert(system, (conn, publisher));
    }
    let good = concord_proto::v1::ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: "orders".into(),
        entity: "customer".into(),
        key: "c-1".into(),
        op: concord_proto::v1::Op::Upsert as i32,
        schema_version: 1,
        ..Default::default()
    };
    let wrong_entity = concord_proto::v1::ChangeEvent {
        entity: "invoice".into(),
        ..good.clone()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "orders.customer",
            b"\xff\xfe not protobuf at all".to_vec(),
            "undecodable",
        ),
        (
            "orders.invoice",
            wrong_entity.encode_to_vec(),
            "unknown_entity",
        ),
        (
            "support.customer",
            good.encode_to_vec(),
            "routing_key_mismatch",
        ),
    ];
    for (rk, body, _) in &cases {
        let system = rk.split('.').next().unwrap_or_default();
        let props = MessageProps::new().user_id(env.vhost().system_user(system));
        publishers[system]
            .1
            .publish(&topo.ingress_exchange(), rk, body, props)
            .await?
            .await?;
    }
    // Only the operator may read the router's dead letters.
    let conn = concord_amqp::connect(&env.operator_uri(), "it-poison-operator").await?;
    let channel = conn.open_channel().await?;
    let mut dlq = concord_amqp::consume(&channel, &topo.router_dlq(), "it-poison-dlq", 10).await?;
    for (rk, body, reason) in &cases {
        let d = tokio::time::timeout(Duration::from_secs(30), dlq.next())
            .await
            .context("no dead letter")?
            .context("dlq stream ended")??;
        assert_eq!(&d.body, body, "the original body is kept");
        assert_eq!(d.header_str("concord-reason"), Some(*reason), "{rk}");
        assert_eq!(d.header_str("concord-routing-key"), Some(*rk));
        assert!(
            d.header_str("concord-detail")
                .is_some_and(|s| !s.is_empty())
        );
        d.ack().await?;
    }
    // The router did not stall: a good change still goes through.
    orders
        .memory
        .create("customer", [("name", text("After the poison"))]);
    support
        .wait(30, "a change after the poison", |m| m.incoming_applied >= 1)
        .await?;
    assert!(
        support
            .memory
            .find("customer", "name", "After the poison")
            .is_some()
    );
    run.shutdown().await
}
