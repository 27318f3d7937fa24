#![allow(clippy::unwrap_used, clippy::expect_used)]
use lapin::{options::*, Connection, ConnectionProperties};

#[tokio::main]
async fn main() {
    let conn = Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    println!("{:?}", ch.queue_delete("scratch.nonexist".into(), QueueDeleteOptions::default()).await);
    println!("{:?}", ch.exchange_delete("scratch.nonexist".into(), ExchangeDeleteOptions::default()).await);
    println!("{:?}", ch.status().connected());
}
