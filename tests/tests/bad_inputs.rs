//! A corpus of bad inputs published to the ingress exchange, interleaved with good events: each
//! bad message lands in the router's dead-letter queue exactly once, with its reason and its
//! original body; every good event reaches its subscribers; the router never stops routing.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Context, ensure};
use concord_amqp::{MessageProps, Publisher, PublisherOptions, Topology};
use concord_it::*;
use concord_policy::DeadLetterReason as R;
use concord_policy::clock::from_ms;
use concord_proto::v1::{ChangeEvent, FieldClock, Op};
use concord_router::{HEADER_DETAIL, HEADER_REASON, HEADER_ROUTING_KEY, Router};
use concord_seed_model::seed::v1::Customer;
use futures::StreamExt;
use prost::Message;

/// The router's size limit in this test.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

use concord_amqp::now_ms;

fn clock(source: &str, at_ms: u64) -> FieldClock {
    FieldClock {
        hlc: from_ms(at_ms),
        system: source.to_owned(),
        rank: 0,
    }
}

/// A valid upsert of `name` by orders.
fn good(key: &str, name: &str) -> ChangeEvent {
    ChangeEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        source: "orders".into(),
        entity: "customer".into(),
        key: key.into(),
        op: Op::Upsert as i32,
        record: Customer {
            name: Some(name.into()),
            ..Default::default()
        }
        .encode_to_vec(),
        field_mask: vec!["name".into()],
        clocks: [("name".to_owned(), clock("orders", now_ms()))].into(),
        schema_version: 1,
        observed_at_ms: now_ms(),
        ..Default::default()
    }
}

/// Pseudo-random bytes (xorshift), the same every run.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One bad message and what the router must say about it.
#[derive(Debug)]
struct Case {
    what: &'static str,
    routing_key: String,
    body: Vec<u8>,
    reason: R,
    /// A name the accepted part of the message carries to the subscribers, when the message
    /// is also routed (unknown fields).
    routed_name: Option<&'static str>,
    /// The system whose broker user publishes it (with its `user_id`, which the broker checks).
    publisher: &'static str,
}

fn case(what: &'static str, routing_key: &str, body: Vec<u8>, reason: R) -> Case {
    Case {
        what,
        routing_key: routing_key.to_owned(),
        body,
        reason,
        routed_name: None,
        publisher: "orders",
    }
}

fn corpus() -> anyhow::Result<Vec<Case>> {
    let rk = "orders.customer";
    let mut cases = Vec::new();

    // Random bytes (the first seed whose bytes are not a ChangeEvent by chance).
    let random = (1..100u64)
        .map(|seed| noise(seed, 300))
        .find(|b| ChangeEvent::decode(b.as_slice()).is_err())
        .context("no undecodable noise")?;
    cases.push(case("random bytes", rk, random, R::Undecodable));

    // A valid event cut short, inside its record.
    let whole = good("truncated", "Truncated").encode_to_vec();
    let cut = (1..whole.len())
        .rev()
        .find(|n| ChangeEvent::decode(&whole[..*n]).is_err())
        .context("every prefix decodes")?;
    cases.push(case(
        "truncated protobuf",
        rk,
        whole[..cut].to_vec(),
        R::Undecodable,
    ));

    // The envelope's `event_id` (a string) sent as a varint.
    let mut body = good("wire", "Wire").encode_to_vec();
    push_varint(&mut body, 1 << 3);
    push_varint(&mut body, 7);
    ensure!(ChangeEvent::decode(body.as_slice()).is_err());
    cases.push(case(
        "envelope field of the wrong wire type",
        rk,
        body,
        R::Undecodable,
    ));

    // The record's `name` (a string) sent as a varint.
    let mut ev = good("record-wire", "unused");
    ev.record = vec![1 << 3, 42];
    cases.push(case(
        "record field of the wrong wire type",
        rk,
        ev.encode_to_vec(),
        R::InvalidRecord,
    ));

    // Over the size limit.
    let big = good("big", &"x".repeat(MAX_MESSAGE_BYTES + 1)).encode_to_vec();
    cases.push(case("over the size limit", rk, big, R::TooLarge));

    // A system the policy does not know (broker user, routing key and envelope agree).
    let mut ev = good("billing", "Billing");
    ev.source = "billing".into();
    ev.clocks = [("name".to_owned(), clock("billing", now_ms()))].into();
    cases.push(Case {
        publisher: "billing",
        ..case(
            "unknown system",
            "billing.customer",
            ev.encode_to_vec(),
            R::UnknownSystem,
        )
    });

    // An entity the policy does not know.
    let mut ev = good("invoice", "Invoice");
    ev.entity = "invoice".into();
    cases.push(case(
        "unknown entity",
        "orders.invoice",
        ev.encode_to_vec(),
        R::UnknownEntity,
    ));

    // A field the entity does not have, next to one it has: the known field is routed, the
    // original goes to the dead-letter queue.
    let mut ev = good("partly-unknown", "Partly unknown");
    ev.field_mask.push("loyalty_points".into());
    ev.clocks
        .insert("loyalty_points".into(), clock("orders", now_ms()));
    cases.push(Case {
        routed_name: Some("Partly unknown"),
        ..case("unknown field", rk, ev.encode_to_vec(), R::UnknownField)
    });

    // Envelopes that contradict their routing key.
    // (Published by support's user: the broker lets it use its own routing keys only.)
    cases.push(Case {
        publisher: "support",
        ..case(
            "source contradicts the routing key",
            "support.customer",
            good("liar-1", "Liar 1").encode_to_vec(),
            R::RoutingKeyMismatch,
        )
    });
    let mut ev = good("liar-2", "Liar 2");
    ev.entity = "invoice".into();
    cases.push(case(
        "entity contradicts the routing key",
        rk,
        ev.encode_to_vec(),
        R::RoutingKeyMismatch,
    ));
    // (The broker refuses this routing key from orders' user; the operator may use any.)
    cases.push(Case {
        publisher: "operator",
        ..case(
            "routing key without entity",
            "orders",
            good("liar-3", "Liar 3").encode_to_vec(),
            R::RoutingKeyMismatch,
        )
    });

    // A field clock one day in the future.
    let mut ev = good("future", "Future");
    ev.clocks = [("name".to_owned(), clock("orders", now_ms() + 86_400_000))].into();
    cases.push(case(
        "clock a day ahead",
        rk,
        ev.encode_to_vec(),
        R::ClockSkew,
    ));

    // A field mask of thousands of names.
    let mut ev = good("huge-mask", "Huge mask");
    ev.field_mask = (0..4000).map(|i| format!("field_{i}")).collect();
    cases.push(case(
        "huge field mask",
        rk,
        ev.encode_to_vec(),
        R::FieldMaskTooLarge,
    ));

    // A name twice in the mask.
    let mut ev = good("twice", "Twice");
    ev.field_mask = vec!["name".into(), "name".into()];
    cases.push(case(
        "duplicate field names",
        rk,
        ev.encode_to_vec(),
        R::DuplicateField,
    ));

    // A changed field without its clock, and a delete without its record clock.
    let mut ev = good("no-clock", "No clock");
    ev.clocks.clear();
    cases.push(case(
        "missing field clock",
        rk,
        ev.encode_to_vec(),
        R::MissingClock,
    ));
    let mut ev = good("no-record-clock", "unused");
    ev.op = Op::Delete as i32;
    ev.field_mask.clear();
    ev.clocks.clear();
    ev.record.clear();
    cases.push(case(
        "delete without record clock",
        rk,
        ev.encode_to_vec(),
        R::MissingClock,
    ));

    // A string of the envelope that is not UTF-8.
    let mut body = good("utf8", "Utf8").encode_to_vec();
    body.extend_from_slice(&[2 << 3 | 2, 2, 0xff, 0xfe]);
    ensure!(ChangeEvent::decode(body.as_slice()).is_err());
    cases.push(case("invalid UTF-8", rk, body, R::Undecodable));

    // Published by a user that is no system's (the operator, whom the broker lets use any
    // routing key) for orders: the broker vouches for the user, the router refuses the claim.
    cases.push(Case {
        publisher: "operator",
        ..case(
            "user id contradicts the source",
            rk,
            good("impostor", "Impostor").encode_to_vec(),
            R::UserIdMismatch,
        )
    });

    // Envelope fields out of range.
    let mut ev = good("bad-id", "Bad id");
    ev.event_id = "not-a-uuid".into();
    cases.push(case(
        "event id not a UUID",
        rk,
        ev.encode_to_vec(),
        R::InvalidEventId,
    ));
    let mut ev = good("v2", "Version 2");
    ev.schema_version = 2;
    cases.push(case(
        "schema version 2",
        rk,
        ev.encode_to_vec(),
        R::UnsupportedSchemaVersion,
    ));
    cases.push(case(
        "empty body",
        rk,
        Vec::new(),
        R::UnsupportedSchemaVersion,
    ));
    let mut ev = good("no-op", "No op");
    ev.op = Op::Unspecified as i32;
    cases.push(case("OP_UNSPECIFIED", rk, ev.encode_to_vec(), R::InvalidOp));
    let mut ev = good("", "Empty key");
    ev.key.clear();
    cases.push(case("empty key", rk, ev.encode_to_vec(), R::InvalidKey));
    Ok(cases)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_dead_lettered_with_their_reason_and_routing_goes_on() -> anyhow::Result<()>
{
    let env = Env::new("bad", &["delivery", "orders", "support", "billing"])?;
    let ns = env.ns();
    let dir = tempfile::tempdir()?;
    let mut config = env.router_config();
    config.max_message_bytes = MAX_MESSAGE_BYTES;
    let router = Router::start(config, seed_policy()).await?;
    tokio::time::timeout(Duration::from_secs(30), router.wait_ready())
        .await
        .context("router not ready")??;
    let nodes = start_seed_nodes(&env, dir.path()).await?;
    let [delivery, orders, support] = [&nodes[0], &nodes[1], &nodes[2]];
    let topo = Topology::new(ns);

    let cases = corpus()?;
    let mut by_body: HashMap<&[u8], &Case> = HashMap::new();
    for c in &cases {
        ensure!(
            by_body.insert(c.body.as_slice(), c).is_none(),
            "two cases have the same body: {}",
            c.what
        );
    }

    // Publish: a good event before every bad one; the last message is bad, so that once it is
    // in the dead-letter queue, every earlier dead letter is too (one publisher, one queue).
    // One connection and publisher per publishing system, as its broker user.
    let mut publishers = BTreeMap::new();
    let user_of = |system: &str| match system {
        "operator" => env.vhost().operator_user().to_owned(),
        system => env.vhost().system_user(system),
    };
    for system in ["orders", "support", "billing", "operator"] {
        let uri = env.vhost().uri(&user_of(system));
        let conn = concord_amqp::connect(&uri, &format!("it-bad-{system}")).await?;
        let publisher = Publisher::open(&conn, PublisherOptions::default()).await?;
        publishers.insert(system, (conn, publisher));
    }
    let as_user = |system: &str| MessageProps::new().user_id(user_of(system));
    let publisher = &publishers["orders"].1;
    let mut good_names = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let name = format!("good-{i}");
        let ev = good(&format!("good-{i}"), &name);
        good_names.push(name);
        publisher
            .publish(
                &topo.ingress_exchange(),
                "orders.customer",
                &ev.encode_to_vec(),
                as_user("orders"),
            )
            .await?
            .await
            .context("publishing a good event")?;
        publishers[c.publisher]
            .1
            .publish(
                &topo.ingress_exchange(),
                &c.routing_key,
                &c.body,
                as_user(c.publisher),
            )
            .await?
            .await
            .with_context(|| format!("publishing {}", c.what))?;
    }

    // Every bad message is in the dead-letter queue once, with its reason (which only the
    // operator may read).
    let operator = concord_amqp::connect(&env.operator_uri(), "it-bad-operator").await?;
    let channel = operator.open_channel().await?;
    let mut dlq = concord_amqp::consume(&channel, &topo.router_dlq(), "it-bad-dlq", 100).await?;
    let last = cases.last().context("empty corpus")?;
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    loop {
        let d = tokio::time::timeout(Duration::from_secs(30), dlq.next())
            .await
            .with_context(|| format!("dead letters missing; got {seen:?}"))?
            .context("the dead-letter consumer ended")??;
        let c = by_body.get(d.body.as_slice()).copied().with_context(|| {
            format!(
                "an unexpected dead letter ({:?}, {} bytes)",
                d.header_str(HEADER_REASON),
                d.body.len()
            )
        })?;
        *seen.entry(c.what).or_default() += 1;
        ensure!(seen[c.what] == 1, "{} dead-lettered twice", c.what);
        ensure!(
            d.header_str(HEADER_REASON) == Some(c.reason.as_str()),
            "{}: reason {:?}, expected {}",
            c.what,
            d.header_str(HEADER_REASON),
            c.reason.as_str()
        );
        ensure!(
            d.header_str(HEADER_ROUTING_KEY) == Some(c.routing_key.as_str()),
            "{}: routing key {:?}",
            c.what,
            d.header_str(HEADER_ROUTING_KEY)
        );
        ensure!(
            d.header_str(HEADER_DETAIL).is_some_and(|s| !s.is_empty()),
            "{}: no detail",
            c.what
        );
        d.ack().await?;
        if std::ptr::eq(c, last) {
            break;
        }
    }
    let missing: Vec<&str> = cases
        .iter()
        .filter(|c| !seen.contains_key(c.what))
        .map(|c| c.what)
        .collect();
    ensure!(missing.is_empty(), "never dead-lettered: {missing:?}");

    // Every good event (and the known field of the partly unknown one) reached both subscribers.
    let mut names: Vec<&str> = good_names.iter().map(String::as_str).collect();
    names.extend(cases.iter().filter_map(|c| c.routed_name));
    let has_all = |n: &Node| {
        names
            .iter()
            .all(|name| n.memory.find("customer", "name", name).is_some())
    };
    converge(
        &[support, delivery],
        30,
        "every good event in support and delivery",
        || has_all(support) && has_all(delivery),
    )
    .await?;
    for n in [support, delivery] {
        // A record shows in the system before the runner counts it as applied.
        n.wait(30, "every good event counted", |m| {
            m.incoming_applied as usize >= names.len()
        })
        .await?;
        let m = n.metrics();
        ensure!(
            m.incoming_applied as usize == names.len() && m.dead_lettered == 0,
            "{}: nothing but the good events arrives: {m:?}",
            n.system
        );
    }
    ensure!(orders.metrics().incoming == 0, "orders got its own events");

    // The router never stopped, and counted what it did.
    ensure!(router.is_ready(), "the router is not routing");
    ensure!(
        router.sessions_started() == 1,
        "the router reconnected ({} sessions)",
        router.sessions_started()
    );
    let metrics = router.metrics();
    let mut expected: HashMap<R, u64> = HashMap::new();
    for c in &cases {
        *expected.entry(c.reason).or_default() += 1;
    }
    for (reason, n) in &expected {
        ensure!(
            metrics.dead_lettered_total(*reason) == *n,
            "dead_lettered_total{{reason={}}} = {}, expected {n}",
            reason.as_str(),
            metrics.dead_lettered_total(*reason)
        );
    }
    ensure!(
        metrics.events_in_sum() == 2 * cases.len() as u64,
        "events_in_sum = {}",
        metrics.events_in_sum()
    );

    for n in nodes {
        n.runner.shutdown().await?;
    }
    router.shutdown().await?;
    Ok(())
}
