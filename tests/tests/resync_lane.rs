//! The resync lane never holds live changes back: with a large backfill queued on
//! `{ns}.router.resync` and live changes on `{ns}.router`, the router serves the live input
//! first. Shown by the order in which the copies reach the target's inbox, not by timings.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use concord_amqp::{MessageProps, Publisher, PublisherOptions};
use concord_it::*;
use concord_policy::clock::from_ms;
use concord_proto::v1::{ChangeEvent, FieldClock, Op};
use concord_seed_model::seed::v1::Customer;
use futures::StreamExt;
use prost::Message;

fn event(key: &str, op: Op) -> ChangeEvent {
    let now = concord_amqp::now_ms();
    ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: "orders".into(),
        entity: "customer".into(),
        key: key.into(),
        op: op as i32,
        record: Customer {
            name: Some(format!("name of {key}")),
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
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_changes_overtake_a_large_resync_in_progress() -> anyhow::Result<()> {
    const BULK: usize = 3000;
    const LIVE: usize = 20;
    let env = Env::seed("resync-lane")?;
    let config = env.router_config();
    let resync_prefetch = usize::from(config.resync_lane_prefetch());
    // The router declares the topology, then stops: both inputs fill up while it is away.
    let router = start_router_with(config.clone(), &seed_policy()).await?;
    let topology = router.topology().clone();
    router.shutdown().await?;

    let orders = concord_amqp::connect(&env.system_uri("orders"), "it-orders").await?;
    let publisher = Publisher::open(&orders, PublisherOptions::default()).await?;
    let user = env.vhost().system_user("orders");
    let mut confirms = Vec::new();
    for i in 0..BULK {
        let ev = event(&format!("bulk-{i:05}"), Op::Snapshot);
        let props = MessageProps::new()
            .user_id(&user)
            .header(concord_amqp::HEADER_KEY, format!("customer/{}", ev.key))
            .header(concord_amqp::HEADER_RESYNC_TARGET, "support");
        confirms.push(
            publisher
                .publish(
                    &topology.resync_exchange(),
                    "orders.customer",
                    &ev.encode_to_vec(),
                    props,
                )
                .await?,
        );
    }
    for i in 0..LIVE {
        let ev = event(&format!("live-{i:02}"), Op::Create);
        let props = MessageProps::new()
            .user_id(&user)
            .header(concord_amqp::HEADER_KEY, format!("customer/{}", ev.key));
        confirms.push(
            publisher
                .publish(
                    &topology.ingress_exchange(),
                    "orders.customer",
                    &ev.encode_to_vec(),
                    props,
                )
                .await?,
        );
    }
    for c in confirms {
        c.await?;
    }
    orders.close().await?;

    // The router comes back with a backlog on both inputs.
    let router = start_router_with(config, &seed_policy()).await?;
    // Support's inbox, read in order (as the operator, who may read every queue).
    let operator = concord_amqp::connect(&env.operator_uri(), "it-operator").await?;
    let channel = operator.open_channel().await?;
    let mut inbox =
        concord_amqp::consume(&channel, &topology.inbox("support"), "it-reader", 500).await?;
    let mut order = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(120), async {
        while order.len() < BULK + LIVE {
            let d = inbox.next().await.unwrap()?;
            order.push(ChangeEvent::decode(d.body.as_slice())?.key);
            d.ack().await?;
        }
        anyhow::Ok(())
    });
    read.await??;
    let last_live = order.iter().rposition(|k| k.starts_with("live-")).unwrap();
    let bulk_before = order[..last_live]
        .iter()
        .filter(|k| k.starts_with("bulk-"))
        .count();
    eprintln!(
        "the last of {LIVE} live copies came in position {}, after {bulk_before} of {BULK} resync copies (resync prefetch {resync_prefetch})",
        last_live + 1
    );
    // Every live change went ahead of the backfill, give or take what the resync lane had
    // prefetched and in flight when the router started (in one FIFO queue, all 3000 would have
    // gone first).
    assert!(
        bulk_before <= 4 * resync_prefetch,
        "{bulk_before} resync copies went before the last live one"
    );
    // And the backfill went through in full.
    assert_eq!(
        order.iter().filter(|k| k.starts_with("bulk-")).count(),
        BULK
    );
    operator.close().await?;
    router.shutdown().await?;
    Ok(())
}
