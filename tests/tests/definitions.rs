//! The broker definitions `concord broker-defs` writes hold exactly the exchanges, queues and
//! bindings (with their arguments) the router declares: a router declares its topology in a
//! fresh vhost, the broker exports what it holds, and the two are compared, for each queue type
//! with and without partitions.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use concord_it::*;
use concord_router::{QueueType, RouterConfig};
use serde_json::Value;

/// An exchange, queue or binding as a comparable line: every field but the vhost.
fn lines(definitions: &Value, kind: &str) -> anyhow::Result<BTreeSet<String>> {
    let items = definitions
        .get(kind)
        .and_then(Value::as_array)
        .with_context(|| format!("no {kind} in {definitions}"))?;
    Ok(items
        .iter()
        .map(|item| {
            let mut item = item.clone();
            if let Some(map) = item.as_object_mut() {
                map.remove("vhost");
            }
            item.to_string()
        })
        .collect())
}

async fn declared_equals_defined(
    test: &str,
    queue_type: QueueType,
    partitions: u16,
) -> anyhow::Result<()> {
    let env = Env::seed(test)?;
    let config = RouterConfig {
        queue_type,
        partitions,
        ..env.router_config()
    };
    let router = start_router_with(config.clone(), &seed_policy()).await?;
    let vhost = concord_admin::management::segment(env.ns());
    let management = &env.vhost().broker().management;
    // What the router declared, as the broker exports it.
    let exported: Value =
        tokio::task::block_in_place(|| management.get(&format!("definitions/{vhost}")))?;
    // What `concord broker-defs` writes for the same config.
    let systems: Vec<String> = SEED_SYSTEMS.iter().map(|s| (*s).to_owned()).collect();
    let plan = config.topology().plan(&systems)?;
    let written = serde_json::to_value(env.vhost().spec().definitions(&plan, &Default::default()))?;
    for kind in ["exchanges", "queues", "bindings"] {
        let (declared, defined) = (lines(&exported, kind)?, lines(&written, kind)?);
        assert_eq!(
            declared, defined,
            "{kind} declared by the router (left) and written by broker-defs (right) differ"
        );
        assert!(!defined.is_empty());
    }
    // The router queue(s) and its DLQ, the resync lane and the control queue (never
    // partitioned), and an inbox and a DLQ per system.
    let queues = lines(&written, "queues")?.len();
    assert_eq!(
        queues,
        usize::from(partitions) + 1 + 2 + 2 * SEED_SYSTEMS.len()
    );
    tokio::time::timeout(Duration::from_secs(30), router.shutdown()).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_definitions_are_what_the_router_declares_with_classic_queues() -> anyhow::Result<()> {
    declared_equals_defined("defs-classic", QueueType::Classic, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_definitions_are_what_the_router_declares_with_quorum_queues() -> anyhow::Result<()> {
    declared_equals_defined("defs-quorum", QueueType::Quorum, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_definitions_are_what_the_router_declares_with_partitions() -> anyhow::Result<()> {
    declared_equals_defined("defs-partitions", QueueType::Classic, 4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_definitions_are_what_the_router_declares_with_quorum_partitions() -> anyhow::Result<()>
{
    declared_equals_defined("defs-quorum-partitions", QueueType::Quorum, 3).await
}
