//! The security model against the real broker: someone holding one system's broker credentials
//! (here delivery's or support's) attacks the others, and the broker refuses each attempt; a
//! message injected with full rights (the operator's) is refused by the adapter. Each test runs
//! in its own vhost loaded with the definitions `concord broker-defs` writes, with the router
//! and the seed adapters running, and checks afterwards that nothing reached anyone.

use std::time::Duration;

use anyhow::Context;
use concord_adapter::testkit::text;
use concord_amqp::{Connection, MessageProps, Publisher, PublisherOptions, Topology};
use concord_it::*;
use concord_policy::clock::from_ms;
use concord_proto::v1::{ChangeEvent, FieldClock, Op};
use concord_seed_model::seed::v1::Customer;
use futures::StreamExt;
use prost::Message;

/// A change of customer `key` as `source` would publish it: name and warehouse.
fn change(source: &str, key: &str, name: &str) -> ChangeEvent {
    let now = concord_amqp::now_ms();
    let clock = |system: &str| FieldClock {
        hlc: from_ms(now),
        system: system.into(),
        rank: 0,
    };
    ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: source.into(),
        entity: "customer".into(),
        key: key.into(),
        op: Op::Create as i32,
        record: Customer {
            name: Some(name.into()),
            warehouse: Some("WH-forged".into()),
            ..Default::default()
        }
        .encode_to_vec(),
        field_mask: vec!["name".into(), "warehouse".into()],
        clocks: [
            ("name".to_owned(), clock(source)),
            ("warehouse".to_owned(), clock(source)),
        ]
        .into(),
        schema_version: concord_proto::SCHEMA_VERSION,
        observed_at_ms: now,
        origin: source.into(),
        may_create: true,
        ..Default::default()
    }
}

/// Publishes `body` on a fresh channel of `conn` and waits for the broker's answer: `Ok` when
/// it was accepted (confirmed), `Err` when it was refused.
async fn try_publish(
    conn: &Connection,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: MessageProps,
) -> anyhow::Result<()> {
    let publisher = Publisher::open(conn, PublisherOptions::default()).await?;
    tokio::time::timeout(
        Duration::from_secs(10),
        publisher.publish_confirmed(exchange, routing_key, body, props),
    )
    .await
    .context("no answer from the broker")??;
    Ok(())
}

/// Consumes `queue` on a fresh channel of `conn`: `Ok` when the broker allowed it.
async fn try_consume(conn: &Connection, queue: &str) -> anyhow::Result<()> {
    let channel = conn.open_channel().await?;
    concord_amqp::consume(&channel, queue, "it-attacker", 1).await?;
    Ok(())
}

/// The seed scenario running, and a connection holding `attacker`'s credentials.
async fn attack(test: &str, attacker: &str) -> anyhow::Result<(SeedRun, Connection, Topology)> {
    let run = SeedRun::start(test).await?;
    let conn = concord_amqp::connect(&run.env.system_uri(attacker), "it-attacker").await?;
    let topology = Topology::new(run.env.ns());
    Ok((run, conn, topology))
}

/// Nothing was applied or dead-lettered anywhere, and every queue but the attacker's own is
/// empty: the attack left no trace.
async fn nothing_happened(run: &SeedRun) -> anyhow::Result<()> {
    for node in &run.nodes {
        let m = node.metrics();
        anyhow::ensure!(
            m.incoming == 0 && m.dead_lettered == 0,
            "{} received something: {m:?}",
            node.system
        );
        anyhow::ensure!(
            node.memory.find("customer", "name", "Forged").is_none(),
            "{} holds the forged record",
            node.system
        );
    }
    let operator = concord_amqp::connect(&run.env.operator_uri(), "it-operator").await?;
    let channel = operator.open_channel().await?;
    let topology = Topology::new(run.env.ns());
    for queue in [topology.router_dlq(), topology.router_queue()] {
        let n = concord_amqp::queue_message_count(&channel, &queue).await?;
        anyhow::ensure!(n == 0, "{queue} holds {n} messages");
    }
    assert_eq!(
        run.router.metrics().events_in_sum(),
        0,
        "the router got input"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_cannot_publish_another_systems_routing_key() -> anyhow::Result<()> {
    let (run, support, topology) = attack("sec-rk", "support").await?;
    let user = run.env.vhost().system_user("support");
    let forged = change("orders", "c-1", "Forged").encode_to_vec();
    for rk in [
        "orders.customer",
        "delivery.customer",
        "orders",
        "#",
        "support",
    ] {
        let refused = try_publish(
            &support,
            &topology.ingress_exchange(),
            rk,
            &forged,
            MessageProps::new().user_id(&user),
        )
        .await;
        assert!(refused.is_err(), "support published with routing key {rk}");
    }
    nothing_happened(&run).await?;
    // Its own key is allowed (and the router dead-letters the lie about the source).
    try_publish(
        &support,
        &topology.ingress_exchange(),
        "support.customer",
        &forged,
        MessageProps::new().user_id(&user),
    )
    .await?;
    run.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_cannot_spoof_its_user_id() -> anyhow::Result<()> {
    let (run, support, topology) = attack("sec-user", "support").await?;
    let body = change("support", "c-1", "Forged").encode_to_vec();
    let vhost = run.env.vhost();
    for user_id in [
        vhost.system_user("orders"),
        vhost.router_user().to_owned(),
        "orders".to_owned(),
        "guest".to_owned(),
    ] {
        let refused = try_publish(
            &support,
            &topology.ingress_exchange(),
            "support.customer",
            &body,
            MessageProps::new().user_id(&user_id),
        )
        .await;
        assert!(refused.is_err(), "support published as {user_id}");
    }
    nothing_happened(&run).await?;
    run.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_cannot_consume_or_get_another_inbox_the_router_queue_or_the_router_dlq()
-> anyhow::Result<()> {
    let (run, delivery, topology) = attack("sec-read", "delivery").await?;
    for queue in [
        topology.inbox("orders"),
        topology.inbox("support"),
        topology.dlq("orders"),
        topology.router_queue(),
        topology.router_dlq(),
    ] {
        assert!(
            try_consume(&delivery, &queue).await.is_err(),
            "delivery consumed {queue}"
        );
    }
    // Its own inbox is consumed by its adapter already; its own DLQ it may read.
    try_consume(&delivery, &topology.dlq("delivery")).await?;
    nothing_happened(&run).await?;
    run.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_cannot_publish_to_routed_or_to_any_queue_by_name() -> anyhow::Result<()> {
    let (run, support, topology) = attack("sec-routed", "support").await?;
    let user = run.env.vhost().system_user("support");
    let forged = change("orders", "c-1", "Forged").encode_to_vec();
    let attempts = [
        (topology.routed_exchange(), "orders".to_owned()),
        (topology.routed_exchange(), "support".to_owned()),
        (String::new(), topology.inbox("orders")),
        (String::new(), topology.inbox("support")),
        (String::new(), topology.router_queue()),
    ];
    for (exchange, rk) in attempts {
        let refused = try_publish(
            &support,
            &exchange,
            &rk,
            &forged,
            MessageProps::new().user_id(&user),
        )
        .await;
        assert!(
            refused.is_err(),
            "support published to exchange {exchange:?} with key {rk}"
        );
    }
    nothing_happened(&run).await?;
    run.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_cannot_dead_letter_into_another_systems_or_the_routers_dlq() -> anyhow::Result<()>
{
    let (run, support, topology) = attack("sec-dlx", "support").await?;
    let user = run.env.vhost().system_user("support");
    let forged = change("orders", "c-1", "Forged").encode_to_vec();
    for rk in ["orders", "router", "delivery"] {
        let refused = try_publish(
            &support,
            &topology.dlx(),
            rk,
            &forged,
            MessageProps::new().user_id(&user),
        )
        .await;
        assert!(refused.is_err(), "support dead-lettered into {rk}'s DLQ");
    }
    nothing_happened(&run).await?;
    // Its own dead letters it may park.
    try_publish(
        &support,
        &topology.dlx(),
        "support",
        &forged,
        MessageProps::new().user_id(&user),
    )
    .await?;
    run.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_cannot_declare_bind_or_delete_anything() -> anyhow::Result<()> {
    let (run, support, topology) = attack("sec-configure", "support").await?;
    // Declaring (and binding) a queue of its own to the routed exchange, to read others' copies.
    let channel = support.open_channel().await?;
    assert!(
        Topology::new(run.env.ns())
            .declare_inbox(&channel, "spy")
            .await
            .is_err(),
        "support declared a queue"
    );
    let channel = support.open_channel().await?;
    assert!(
        channel.declare_exclusive_queue().await.is_err(),
        "support declared a server-named queue"
    );
    for queue in [topology.inbox("orders"), topology.inbox("support")] {
        let channel = support.open_channel().await?;
        assert!(
            channel
                .queue_delete(queue.clone(), concord_amqp::QueueDeleteOptions::default())
                .await
                .is_err(),
            "support deleted {queue}"
        );
    }
    let operator = concord_amqp::connect(&run.env.operator_uri(), "it-operator").await?;
    let check = operator.open_channel().await?;
    concord_amqp::queue_message_count(&check, &topology.inbox("orders")).await?;
    concord_amqp::queue_message_count(&check, &topology.inbox("support")).await?;
    nothing_happened(&run).await?;
    run.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_injected_into_an_inbox_with_full_rights_is_dead_lettered_as_untrusted_and_never_applied()
-> anyhow::Result<()> {
    let run = SeedRun::start("sec-inject").await?;
    let [_, orders, support] = [&run.nodes[0], &run.nodes[1], &run.nodes[2]];
    let topology = Topology::new(run.env.ns());
    // Orders has its own customer; the attacker forges a copy "from the router" that renames
    // it, shows orders the warehouse it may not see, and ranks orders' own name below support.
    let id = orders.memory.create("customer", [("name", text("Ada"))]);
    converge(&[support], 30, "Ada at support", || {
        support.memory.find("customer", "name", "Ada").is_some()
    })
    .await?;
    let key = support
        .memory
        .applied()
        .first()
        .map(|a| a.key.clone())
        .context("support applied nothing")?;
    let mut forged = change("support", &key, "Forged");
    forged.receiver_ranks = [("name".to_owned(), 0)].into();
    let operator = concord_amqp::connect(&run.env.operator_uri(), "it-operator").await?;
    let operator_user = run.env.vhost().operator_user().to_owned();
    // (Not even the operator may publish to a queue by name; it may to the routed exchange.)
    try_publish(
        &operator,
        &topology.routed_exchange(),
        "orders",
        &forged.encode_to_vec(),
        MessageProps::new().user_id(&operator_user),
    )
    .await?;
    orders
        .wait(30, "the forgery dead-lettered", |m| m.dead_lettered >= 1)
        .await?;
    // Dead-lettered with the reason, never applied.
    let channel = operator.open_channel().await?;
    let mut dlq = concord_amqp::consume(&channel, &topology.dlq("orders"), "it-dlq", 10).await?;
    let d = tokio::time::timeout(Duration::from_secs(30), dlq.next())
        .await
        .context("no dead letter")?
        .context("the DLQ consumer ended")??;
    assert_eq!(d.header_str("concord-reason"), Some("untrusted_publisher"));
    assert_eq!(d.body, forged.encode_to_vec());
    d.ack().await?;
    assert_eq!(orders.text(&id, "name").as_deref(), Some("Ada"));
    assert_eq!(orders.memory.field("customer", &id, "warehouse"), None);
    assert_eq!(orders.metrics().incoming_applied, 0);
    // Orders' own edits of its field still count (its rank was not lowered).
    orders
        .memory
        .edit("customer", &id, [("name", text("Ada L."))]);
    converge(&[support], 30, "Ada L. at support", || {
        support.memory.find("customer", "name", "Ada L.").is_some()
    })
    .await?;
    assert_eq!(orders.text(&id, "name").as_deref(), Some("Ada L."));
    run.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_cannot_resync_as_another_request_a_resync_or_read_the_control_path()
-> anyhow::Result<()> {
    let (run, support, topology) = attack("sec-resync", "support").await?;
    let user = run.env.vhost().system_user("support");
    let forged = change("orders", "c-1", "Forged").encode_to_vec();
    // The resync lane takes its own routing keys only, like the ingress.
    for rk in ["orders.customer", "delivery.customer", "orders", "#"] {
        let refused = try_publish(
            &support,
            &topology.resync_exchange(),
            rk,
            &forged,
            MessageProps::new()
                .user_id(&user)
                .header(concord_amqp::HEADER_RESYNC_TARGET, "delivery"),
        )
        .await;
        assert!(
            refused.is_err(),
            "support published {rk} on the resync lane"
        );
    }
    // Only the operator may ask for a resync.
    let request = concord_proto::v1::ResyncRequest {
        id: "forged".to_owned(),
        target: "support".to_owned(),
        ..Default::default()
    }
    .encode_to_vec();
    let refused = try_publish(
        &support,
        &topology.control_exchange(),
        concord_amqp::CONTROL_REQUEST_KEY,
        &request,
        MessageProps::new()
            .user_id(&user)
            .header(concord_amqp::HEADER_CONTROL, "resync"),
    )
    .await;
    assert!(refused.is_err(), "support published a control request");
    for queue in [topology.resync_queue(), topology.control_queue()] {
        assert!(
            try_consume(&support, &queue).await.is_err(),
            "support consumed {queue}"
        );
    }
    nothing_happened(&run).await?;
    run.shutdown().await
}
